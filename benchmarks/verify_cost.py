"""What verifying an artifact costs at load: full sha256 of every file, against a matching verification stamp.

Real artifacts hold gigabytes of weights; this pads a copy of a built artifact with GB_PAD gigabytes of extra
listed files (re-listing and re-sealing its manifest as a build would) and times ``verify_files`` both ways.

    python benchmarks/verify_cost.py artifacts/tiny-sd --pad-gb 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from diffbake.format.integrity import verify_files
from diffbake.format.manifest import MANIFEST_FILE, read_manifest, seal
from diffbake.format.staging import list_files


def pad(artifact: Path, gigabytes: float) -> Path:
    chunk = os.urandom(64 << 20)
    remaining = int(gigabytes * 1e9)
    i = 0
    while remaining > 0:
        n = min(remaining, 1 << 30)
        with open(artifact / "pipeline" / f"pad-{i}.bin", "wb") as f:
            for _ in range(n // len(chunk)):
                f.write(chunk)
            f.write(chunk[: n % len(chunk)])
        remaining -= n
        i += 1
    data = json.loads((artifact / MANIFEST_FILE).read_text())
    data["files"] = {rel: {"size": e.size, "sha256": e.sha256} for rel, e in list_files(artifact).items()}
    (artifact / MANIFEST_FILE).write_text(json.dumps(seal(data)))
    return artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--pad-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DIFFBAKE_STAMP_DIR"] = str(Path(tmp) / "stamps")
        art = pad(Path(shutil.copytree(args.artifact, Path(tmp) / "art")), args.pad_gb)
        manifest = read_manifest(art)
        size = sum(f.size for f in manifest.files.values())
        results = {}
        for mode in ("full", "stamp"):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                how = verify_files(art, manifest, use_stamp=mode == "stamp")
                times.append(time.perf_counter() - start)
            assert how == mode, (mode, how)
            results[mode] = min(times)
        print(f"artifact: {len(manifest.files)} files, {size / 1e9:.2f} GB (page cache warm after the first pass)")
        print(f"full sha256 check: {results['full']:.3f} s ({size / 1e9 / results['full']:.2f} GB/s)")
        print(f"matching stamp:    {results['stamp'] * 1e3:.2f} ms ({results['full'] / results['stamp']:.0f}x less)")


if __name__ == "__main__":
    main()

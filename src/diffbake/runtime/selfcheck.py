"""Every check of an artifact, run in this process: ``python -m diffbake.runtime.selfcheck ARTIFACT [DEVICE] [UNPACK_DIR]``.

``diffbake verify`` runs this in a child process, so that code which crashes (an illegal instruction, a segfault
in a library built for another torch) ends the child, not the caller, and is reported with the stage it reached.
One JSON object per line on stdout: ``{"stage": ..., "detail": ...}`` as each check passes, then ``{"ok": true}``
or ``{"ok": false, "error": ..., "type": ...}``. The compiled code also checks its own inputs here
(AOTI_RUNTIME_CHECK_INPUTS), so a manifest that misdescribes a package's inputs is caught by the self-test.
"""

from __future__ import annotations

import json
import os
import sys

# Read once by each compiled library when it first runs; must be set before any package loads.
os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    from diffbake.errors import DiffbakeError
    from diffbake.runtime.load import load

    artifact = argv[0]
    device = argv[1] if len(argv) > 1 and argv[1] else None
    unpack = argv[2] if len(argv) > 2 and argv[2] else None
    _emit({"stage": "start", "detail": f"checking {artifact}"})
    try:
        load(
            artifact,
            device=device,
            self_test=True,
            unpack_dir=unpack,
            progress=lambda stage, detail: _emit({"stage": stage, "detail": detail}),
        )
    except (DiffbakeError, RuntimeError, OSError) as e:
        # RuntimeError: the compiled code's own input checks (a manifest that misdescribes its package).
        _emit({"ok": False, "error": str(e).strip(), "type": type(e).__name__})
        return 1
    _emit({"ok": True})
    return 0


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    sys.exit(main(sys.argv[1:]))

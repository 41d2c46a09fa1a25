"""The input guards, without a compile: what a call must look like before compiled code runs on it."""

from __future__ import annotations

import pytest
import torch

from diffbake.errors import InputMismatchError
from diffbake.format.manifest import DimSpec, SelfTest, TensorSpec, VariantEntry
from diffbake.runtime.guards import check_call, check_inputs, check_tensor

CPU = torch.device("cpu")
_NO_SELF_TEST = SelfTest(0, {}, {}, [], 0.0, 0.0, 0.0, [], 0.0)


def _variant(batch: int | list[int], *, cfg: bool | None = True) -> VariantEntry:
    dynamic = isinstance(batch, list)
    b = "batch" if dynamic else 2 * batch if cfg else batch
    return VariantEntry(
        package="unet/model.pt2",
        shapes={"batch": batch, "height": 64, "width": 64},
        cfg=cfg,
        inputs=[
            TensorSpec("sample", [b, 4, 32, 32], "float32"),
            TensorSpec("timestep", [b], "float32", coerce=True),
            TensorSpec("encoder_hidden_states", [b, 77, 32], "float32"),
        ],
        dims={"batch": DimSpec(batch[0], batch[1])} if dynamic else {},
        constants={"cross_attention_kwargs": None, "guess_mode": False},
        ignored=["generator"],
        outputs=[TensorSpec("output_0", [b, 4, 32, 32], "float32")],
        max_abs_error=0.0,
        tolerance=0.0,
        error_vs_float32=0.0,
        self_test=_NO_SELF_TEST,
    )


def _call(batch: int, dtype=torch.float32, timestep=500):
    return [torch.zeros(batch, 4, 32, 32, dtype=dtype), timestep, torch.zeros(batch, 77, 32, dtype=dtype)]


def test_a_call_that_fits_passes_with_timesteps_broadcast_and_layouts_made_contiguous():
    sample, timestep, text = _call(2)
    sample = sample.to(memory_format=torch.channels_last)
    out = check_inputs("unet", _variant(1), CPU, [sample, timestep, text])
    assert out[0].is_contiguous() and torch.equal(out[0], sample)
    # An int timestep, as a scheduler may pass it: cast and broadcast as the eager UNet does.
    assert out[1].dtype == torch.float32 and out[1].tolist() == [500.0, 500.0]


def test_a_batch_without_guidance_where_guidance_was_compiled_says_how_to_call():
    with pytest.raises(InputMismatchError) as e:
        check_inputs("unet", _variant(1), CPU, _call(1))
    assert str(e.value) == (
        "unet: input 'sample' has shape (1, 4, 32, 32), but this artifact was compiled for (2, 4, 32, 32) "
        "(1 image(s) per call at 64x64 pixels, with classifier-free guidance); this artifact was built with "
        "cfg = true for 1 image(s) per call: call with guidance_scale > 1 (guidance_scale <= 1 turns "
        "classifier-free guidance off) and 1 image(s) in all, or rebuild with [components.unet] cfg = false"
    )


def test_one_dynamic_dimension_has_one_size_across_inputs():
    variant = _variant([1, 4], cfg=None)
    assert [t.shape[0] for t in check_inputs("unet", variant, CPU, _call(3))[::2]] == [3, 3]
    sample, timestep, _ = _call(3)
    with pytest.raises(InputMismatchError, match=r"^unet: input 'encoder_hidden_states' has shape \(2, 77, 32\), "):
        check_inputs("unet", variant, CPU, [sample, timestep, torch.zeros(2, 77, 32)])
    with pytest.raises(InputMismatchError, match=r"compiled for \(1\.\.4, 4, 32, 32\)"):
        check_inputs("unet", variant, CPU, _call(5))


def test_dtype_none_and_non_tensors_are_refused_by_name():
    with pytest.raises(InputMismatchError) as e:
        check_inputs("unet", _variant(1), CPU, _call(2, dtype=torch.bfloat16))
    assert str(e.value) == (
        "unet: input 'sample' has dtype bfloat16, but this artifact was compiled for float32; load the pipeline "
        "with its own dtype (diffbake.load does) and do not cast it"
    )
    sample, timestep, _ = _call(2)
    with pytest.raises(InputMismatchError, match="^unet: input 'encoder_hidden_states' is required by the compiled"):
        check_inputs("unet", _variant(1), CPU, [sample, timestep, None])
    with pytest.raises(InputMismatchError, match="^unet: input 'sample' must be a tensor, found list"):
        check_inputs("unet", _variant(1), CPU, [[0.0], timestep, torch.zeros(2, 77, 32)])


def test_a_tensor_on_another_device_is_refused_never_moved():
    # The meta device stands for another GPU here: same rule, and no GPU needed.
    with pytest.raises(InputMismatchError) as e:
        check_inputs("unet", _variant(1), torch.device("meta"), _call(2, timestep=torch.zeros(2, device="meta")))
    assert str(e.value) == "unet: input 'sample' is on cpu, but this artifact runs on meta; keep the pipeline on meta"
    spec = TensorSpec("hidden_states", [2, 16, 8], "float32")
    with pytest.raises(InputMismatchError, match="^block 'b': input 'hidden_states' is on cpu, but this artifact runs"):
        check_tensor(
            "block 'b': input 'hidden_states'", spec, torch.zeros(2, 16, 8), torch.device("meta"), lambda t: None
        )


def test_a_bare_cuda_device_is_the_current_gpu_and_host_facts_are_that_gpus(monkeypatch):
    """Guards compare devices with their index, and the facts checked against the manifest are the GPU's that
    runs the code, not device 0's (no GPU needed: torch.cuda's answers are stood in)."""
    from diffbake.format.host import host_facts
    from diffbake.runtime.guards import resolve_device

    gpus = {0: ("NVIDIA A100", (8, 0)), 1: ("NVIDIA H100", (9, 0))}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: gpus[_index(d)][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: gpus[_index(d)][1])
    assert resolve_device("cuda") == "cuda:1"
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cpu") == "cpu"
    facts = host_facts("cuda:0")
    assert (facts["device"], facts["gpu"], facts["compute_capability"]) == ("cuda", "NVIDIA A100", "8.0")
    assert host_facts(resolve_device("cuda"))["gpu"] == "NVIDIA H100"


def _index(device) -> int:
    # torch.cuda's own rule: no device (or one without an index) means the current device.
    index = torch.device(device).index if device is not None else None
    return torch.cuda.current_device() if index is None else index


def test_dimensions_that_follow_one_size_share_its_index():
    # Images per call, the guidance-doubled batch (2 * batch) and SD3's joint text length (77 + T5 tokens).
    variant = VariantEntry(
        **{
            **_variant(1).__dict__,
            "inputs": [
                TensorSpec("pooled", ["batch", 8], "float32"),
                TensorSpec("sample", ["batch_1", 4], "float32"),
                TensorSpec("text", ["batch_1", "text_tokens", 8], "float32"),
            ],
            "dims": {
                "batch": DimSpec(1, 3),
                "batch_1": DimSpec(2, 6, 2, 0, base="batch"),
                "text_tokens": DimSpec(78, 333, 1, 77),
            },
        }
    )
    ok = check_inputs("unet", variant, CPU, [torch.zeros(2, 8), torch.zeros(4, 4), torch.zeros(4, 100, 8)])
    assert [tuple(t.shape) for t in ok] == [(2, 8), (4, 4), (4, 100, 8)]
    with pytest.raises(InputMismatchError, match=r"^unet: input 'sample' has shape \(6, 4\), but this artifact was "):
        check_inputs("unet", variant, CPU, [torch.zeros(2, 8), torch.zeros(6, 4), torch.zeros(6, 100, 8)])
    with pytest.raises(InputMismatchError, match=r"compiled for \(2\.\.6 \(multiple of 2\), 78\.\.333, 8\)"):
        check_inputs("unet", variant, CPU, [torch.zeros(2, 8), torch.zeros(4, 4), torch.zeros(4, 400, 8)])


def test_python_values_must_be_the_ones_compiled():
    variant = _variant(1)
    check_call("unet", variant, {"cross_attention_kwargs": {}, "guess_mode": False, "generator": torch.Generator()})
    with pytest.raises(InputMismatchError) as e:
        check_call("unet", variant, {"cross_attention_kwargs": None, "guess_mode": 0})
    assert str(e.value) == (
        "unet: argument 'guess_mode' is 0, but this artifact was compiled for False (what the pipeline passed when it "
        "was built); call with that value, or rebuild with a recipe whose call passes this one"
    )
    with pytest.raises(InputMismatchError, match=r"^unet: argument 'extra' is not part of the compiled call"):
        check_call("unet", variant, {"cross_attention_kwargs": None, "guess_mode": False, "extra": 3})

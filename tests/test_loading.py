"""Issue 16, loading: the fingerprint covers what is loaded and is hashed once, `torch_dtype` at load, fp16-variant
folders, SD 2.x single files (`--model-config`, `--prediction-type`), gradient checkpointing on every diffusers."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_pipeline import invert_config, write_toy_data

import promptset.artifacts as artifacts
from promptset.artifacts import fingerprint_path, sha256_file_cached
from promptset.backends import create_backend
from promptset.backends.sd import load_sd
from promptset.cli import main
from promptset.errors import UserError
from promptset.stages.generate import generate
from promptset.stages.invert import invert


@pytest.fixture
def count_hashing(monkeypatch):
    """Counts files hashed from their bytes, with this process's memory of hashes cleared (as a new process)."""
    calls = []
    real = artifacts.sha256_file

    def counted(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(artifacts, "sha256_file", counted)
    monkeypatch.setattr(artifacts, "_FILE_HASHES", {})
    return calls


def test_fingerprint_covers_only_loaded_files_and_a_second_load_does_not_rehash(tiny_sd, tmp_path, count_hashing,
                                                                                monkeypatch):
    model = tmp_path / "sd"
    shutil.copytree(tiny_sd, model)
    first = load_sd(str(model), device="cpu").model_hash
    assert first == fingerprint_path(model)  # a save_pretrained folder: every file is loaded, fingerprints as before
    assert len(count_hashing) == len([p for p in model.rglob("*") if p.is_file()])

    # what a Hub snapshot also holds: pickles, other variants, a checkpoint, the safety checker. Never read.
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle" * 1000)
    shutil.copy(unet, model / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (model / "text_encoder" / "pytorch_model.bin").write_bytes(b"pickle")
    (model / "v1-5-pruned.ckpt").write_bytes(b"checkpoint")
    (model / "safety_checker").mkdir()
    (model / "safety_checker" / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(artifacts, "_FILE_HASHES", {})  # a new process: only the disk cache remembers
    count_hashing.clear()
    assert load_sd(str(model), device="cpu").model_hash == first
    assert count_hashing == []  # nothing hashed again, the unused files not at all

    weights = load_file(str(unet))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3  # a fine-tune: same size, other bytes
    save_file(weights, str(unet), metadata={"format": "pt"})
    assert load_sd(str(model), device="cpu").model_hash != first
    assert count_hashing == [str(unet.resolve())]


def test_hash_cache_lets_one_process_hash_and_the_others_read_it(tmp_path, count_hashing, monkeypatch):
    """Ranks that load the same model at once: one hashes each file, the others wait on its lock and read it."""
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * (1 << 20))
    real = artifacts.sha256_file

    def slow(p, *args, **kwargs):
        time.sleep(0.2)
        return real(p, *args, **kwargs)

    monkeypatch.setattr(artifacts, "sha256_file", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(sha256_file_cached(path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(count_hashing) == 1 and len(set(results)) == 1 and len(results) == 3
    entries = list((artifacts.hash_cache_dir()).iterdir())
    assert entries and all(not str(e).startswith(str(tmp_path)) for e in entries)  # outside the model folder


def test_load_uses_torch_dtype_at_load_not_a_cast_of_an_fp32_copy(tiny_sd, monkeypatch):
    from diffusers import UNet2DConditionModel

    loaded = []
    real = UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = real(cls, *args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    backend = load_sd(str(tiny_sd), device="cpu", dtype="bf16")
    assert loaded == [torch.bfloat16] and backend.unet.dtype == torch.bfloat16
    assert backend.text_encoder.dtype == torch.bfloat16


def test_folder_with_only_fp16_variant_weights_is_accepted(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "sd-fp16"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None).to(torch.float16)
    pipe.save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not [*folder.rglob("diffusion_pytorch_model.safetensors"), *folder.rglob("model.safetensors")]
    backend = load_sd(str(folder), device="cpu")  # fp32 on CPU, from the fp16 weights
    reference = load_sd(str(tiny_sd), device="cpu")
    for ours, theirs in zip(backend.unet.parameters(), reference.unet.parameters()):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs.half().float())
    assert backend.model_hash != reference.model_hash


def test_pickle_message_only_when_a_part_has_only_pickles(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(UserError) as err:
        load_sd(str(broken), device="cpu")
    assert "could not load the diffusers folder" in str(err.value) and "pickled" not in str(err.value)
    empty = tmp_path / "empty"
    shutil.copytree(tiny_sd, empty)
    (empty / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no diffusion_pytorch_model.safetensors \(nor .*fp16.safetensors\) in"):
        load_sd(str(empty), device="cpu")


def test_prediction_type_override_is_used_printed_and_part_of_the_model(tiny_sd, tmp_path, capsys):
    plain = create_backend("sd", str(tiny_sd), device="cpu")
    v = create_backend("sd", str(tiny_sd), device="cpu", prediction_type="v_prediction")
    out = capsys.readouterr().out
    assert "prediction type epsilon, native resolution 16 px" in out
    assert "prediction type v_prediction, native resolution 16 px" in out
    assert v.prediction_type == v.noise_scheduler.config.prediction_type == "v_prediction"
    assert v.sample_scheduler.config.prediction_type == "v_prediction"
    assert v.model_hash != plain.model_hash  # prompts learned for one target do not fit the other
    with pytest.raises(UserError, match="--prediction-type 'sample'"):
        create_backend("sd", str(tiny_sd), device="cpu", prediction_type="sample")

    # generate (and evaluate) load the model as invert did: same target, same fingerprint
    data = write_toy_data(tmp_path / "data", per_class=1)
    run = tmp_path / "run"
    invert(invert_config(run, tiny_sd, data=str(data), steps=1, batch_size=3, prediction_type="v_prediction"))
    generate(run=str(run), ipc=1, steps=2, device="cpu", progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["generate"]["prediction_type"] == "v_prediction"


def test_single_file_takes_a_model_config_folder(tiny_sd, tmp_path, monkeypatch, capsys):
    """--model-config reaches diffusers' from_single_file as `config` (offline); its scheduler decides the target."""
    from diffusers import StableDiffusionPipeline

    config = tmp_path / "sd2-base-config"
    shutil.copytree(tiny_sd, config, ignore=shutil.ignore_patterns("*.safetensors"))
    scheduler = config / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
    checkpoint = tmp_path / "v2-model.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.ones(3)}, str(checkpoint))
    seen = {}

    def from_single_file(path, **kwargs):  # diffusers' conversion of the LDM keys is not promptset's to test
        seen.update(kwargs, path=path)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, torch_dtype=kwargs["torch_dtype"])
        pipe.scheduler = type(pipe.scheduler).from_pretrained(kwargs.get("config", tiny_sd), subfolder="scheduler")
        return pipe

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", from_single_file)
    backend = create_backend("sd", str(checkpoint), device="cpu", model_config=str(config))
    assert seen["config"] == str(config) and seen["local_files_only"] is True
    assert seen["torch_dtype"] == torch.float32 and seen["path"] == str(checkpoint)
    assert backend.prediction_type == "v_prediction"
    assert "prediction type v_prediction, native resolution 16 px" in capsys.readouterr().out
    seen.clear()
    guessed = create_backend("sd", str(checkpoint), device="cpu", quiet=True)  # no --model-config: diffusers guesses
    assert "config" not in seen and guessed.model_hash != backend.model_hash

    with pytest.raises(UserError, match="--model-config .* applies to a single-file checkpoint"):
        load_sd(str(tiny_sd), device="cpu", model_config=str(config))
    with pytest.raises(UserError, match="not a diffusers config folder"):
        load_sd(str(checkpoint), device="cpu", model_config=str(tmp_path))
    with pytest.raises(UserError, match="--model-config and --prediction-type are for --backend sd"):
        create_backend("mini", str(tmp_path), device="cpu", prediction_type="epsilon")


def test_cli_takes_model_config_and_prediction_type(tiny_sd, tmp_path, capsys):
    data = write_toy_data(tmp_path / "data", per_class=1)
    code = main(["invert", "--backend", "sd", "--model", str(tiny_sd), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--model-config", str(tiny_sd), "--device", "cpu", "--no-progress"])
    assert code == 2 and "--model-config" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):  # argparse refuses a prediction type that is not one of the choices
        main(["invert", "--prediction-type", "sample"])


# ---------------------------------------------------------------------------------------------------------------
# gradient checkpointing: diffusers 0.30-0.31 checkpoint a block only when `block.training` is True


def test_gradient_checkpointing_takes_effect_as_diffusers_030_checks_it(tiny_sd, monkeypatch):
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    backend = create_backend("sd", str(tiny_sd), device="cpu", quiet=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    layout = backend.layout("a photo of {token}", 1)
    vectors = torch.nn.Parameter(backend.initializer_vector("car").expand(2, 1, -1).clone())

    def step():
        states = backend.encode_placeholder_prompts(layout, vectors)
        loss = backend.denoising_loss(latents, states, torch.Generator().manual_seed(1)).mean()
        vectors.grad = None
        loss.backward()
        return loss.detach(), vectors.grad.clone()

    plain_loss, plain_grad = step()
    assert calls == []
    backend.enable_gradient_checkpointing()
    flagged = [m for m in backend.unet.modules() if getattr(m, "gradient_checkpointing", False)]
    assert flagged and all(m.training for m in flagged)  # the condition diffusers 0.30-0.31 check
    others = [m for m in backend.unet.modules() if not getattr(m, "gradient_checkpointing", False)]
    assert others and not any(m.training for m in others)  # dropout, norms, attention: still eval mode
    loss, grad = step()
    assert len(calls) >= len([m for m in flagged if type(m).__name__.endswith("Block2D")])  # every block recomputes
    assert torch.equal(loss, plain_loss) and torch.allclose(grad, plain_grad, rtol=1e-5, atol=1e-8)

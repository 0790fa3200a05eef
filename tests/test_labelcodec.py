"""Label codecs (issue 17): every codec round-trips through the one decoder, stores exactly the bytes it plans,
and a bad codec string is refused."""

from __future__ import annotations

import pytest
import torch

from promptset.accounting import compressed_size, tensor_data
from promptset.errors import UserError
from promptset.labelcodec import (
    LabelCodec,
    decode_soft_labels,
    encode_labels,
    parse_codec,
    planned_bytes,
    take_rows,
)

C = 10


def _logits(rows: int = 60, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows // 3, 3, C, generator=g) * 4  # (N, P, C): rows are the leading dims


def _stored(tensors: dict) -> dict[str, int]:
    return {k: t.numel() * t.element_size() for k, t in tensors.items()}


@pytest.mark.parametrize("text", ["fp32", "fp16", "int8", "topk:1", "topk:3", f"topk:{C}", "vq:1", "vq:4", "vq:64"])
def test_every_codec_decodes_to_its_shape_and_stores_what_it_plans(text):
    x = _logits()
    codec = parse_codec(text, C)
    tensors, meta = encode_labels(x, codec)
    assert _stored(tensors) == planned_bytes(codec, x.shape[0] * x.shape[1], C)
    y = decode_soft_labels(tensors, meta)
    assert y.shape == x.shape and y.dtype == torch.float32
    again, _ = encode_labels(x, codec)  # deterministic: one set of logits, one code (vq's codebook included)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_raw_codecs_round_to_their_dtype_and_keep_the_old_tensor_name():
    x = _logits()
    tensors, meta = encode_labels(x, parse_codec("fp16"))
    assert list(tensors) == ["soft_labels"] and meta["label_dtype"] == "fp16"
    assert torch.equal(decode_soft_labels(tensors, meta), x.half().float())
    tensors, meta = encode_labels(x, parse_codec("fp32"))
    assert torch.equal(decode_soft_labels(tensors, meta), x)
    legacy = {"soft_labels": x.half()}  # a labels file written before the codecs: no label_codec key
    assert torch.equal(decode_soft_labels(legacy, {"label_dtype": "fp16"}), x.half().float())


def test_int8_is_within_half_a_step_of_every_logit():
    x = _logits()
    tensors, meta = encode_labels(x, parse_codec("int8"))
    assert tensors["soft_labels.values"].dtype == torch.int8
    step = tensors["soft_labels.scale"].float()[..., None]  # (N, P, 1)
    err = (decode_soft_labels(tensors, meta) - x).abs()
    assert (err <= step / 2 + 0.02).all()  # half a step, plus the fp16 rounding of the stored offset
    assert (decode_soft_labels(tensors, meta).argmax(-1) == x.argmax(-1)).float().mean() > 0.95


def test_topk_keeps_the_k_largest_and_fills_the_rest_with_the_mean_of_the_dropped():
    x = _logits()
    tensors, meta = encode_labels(x, parse_codec("topk:3"))
    assert tensors["soft_labels.indices"].dtype == torch.int16
    y = decode_soft_labels(tensors, meta)
    rows, got = x.reshape(-1, C), y.reshape(-1, C)
    for row, out in zip(rows, got):
        top = row.topk(3).indices
        assert torch.equal(out[top], row[top].half().float())
        rest = torch.ones(C, dtype=torch.bool)
        rest[top] = False
        assert torch.allclose(out[rest], row[rest].mean().half().float().expand(C - 3))
    assert torch.equal(y.argmax(-1), x.argmax(-1))  # the top class survives any K


def test_vq_finds_the_clusters_of_clustered_logits():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, C, generator=g) * 5
    centres -= centres.mean(-1, keepdim=True)
    x = centres.repeat_interleave(25, 0) + 0.01 * torch.randn(100, C, generator=g)  # (100, C)
    tensors, meta = encode_labels(x, parse_codec("vq:4"))
    assert tensors["soft_labels.codebook"].shape == (4, C) and tensors["soft_labels.codes"].dtype == torch.uint8
    assert (decode_soft_labels(tensors, meta) - (x - x.mean(-1, keepdim=True))).abs().max() < 0.1
    few, meta = encode_labels(x[:3], parse_codec("vq:64"))  # more entries than rows: one per row, bytes counted
    assert few["soft_labels.codebook"].shape == (3, C)
    assert _stored(few) == planned_bytes(LabelCodec("vq", 64), 3, C)


@pytest.mark.parametrize("text", ["int8", "topk:2", "vq:5"])
def test_rows_taken_from_encoded_labels_decode_to_the_same_rows(text):
    x = _logits()
    tensors, meta = encode_labels(x, parse_codec(text))
    index = torch.tensor([5, 0, 17, 3])
    part, part_meta = take_rows(tensors, meta, index)
    assert torch.equal(decode_soft_labels(part, part_meta), decode_soft_labels(tensors, meta).reshape(-1, C)[index])


@pytest.mark.parametrize("text, message", [
    ("fp8", "is not a label codec"), ("topk", "is not a label codec"), ("int8:3", "is not a label codec"),
    ("topk:0", "K must be a whole number of at least 1"), ("vq:x", "K must be a whole number"),
    (f"topk:{C + 1}", f"more than the {C} classes"),
])  # fmt: skip
def test_bad_codec_strings_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        parse_codec(text, C)


def test_compressed_sizes_are_one_compressor_over_the_canonical_bytes():
    zeros = torch.zeros(1000, dtype=torch.float16)
    assert tensor_data(zeros) == bytes(2000)
    assert compressed_size([tensor_data(zeros)]) < 100 < compressed_size([tensor_data(torch.randn(1000).half())])
    assert compressed_size([b"ab", b"cd"]) == compressed_size([b"abcd"])  # a stream: chunking changes nothing


def test_the_old_label_dtype_spelling_still_names_the_codec():
    from promptset.config import make_config, resolve
    from promptset.stages.evaluate import EvaluateConfig
    from promptset.stages.generate import GenerateConfig

    assert resolve(GenerateConfig, {"label_dtype": "fp32"}, {}).label_codec == "fp32"  # a config.yaml of before
    assert make_config(EvaluateConfig, None, {"label_dtype": "fp32"}, "evaluate").label_codec == "fp32"

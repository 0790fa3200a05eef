"""Label codecs: how the teacher's soft labels (logits, one row of C per patch) are stored, and the one decoder.

- `fp32`, `fp16`: the logits as they are, rounded to the dtype (one tensor `soft_labels`, the format before codecs).
- `int8`: per-row affine quantisation, q = round((x - lo) / s) - 128 with s = (hi - lo) / 255; `lo` and `s` are
  stored in fp16 (`offset`, `scale`), and q is computed against those stored values, so decoding is exact to the grid.
- `topk:K`: the K largest logits (fp16 `values`) and their class indices (int16 `indices`); the other C - K logits
  are replaced by one per-row `fill` value (fp16), the mean of the logits dropped, as LPQLD (Xiao & He, TPAMI 2026)
  fills the rest of a pruned label from a stored value.
- `vq:K`: a codebook of K logit rows (fp16 `codebook`) fitted by k-means (k-means++ start from a fixed seed, then
  Lloyd steps until no assignment changes) on the set's logits, each row centred first (a softmax ignores a row's
  offset, so decoded rows are centred logits), and one index per patch (`codes`: uint8 when K <= 256). The codebook
  has min(K, rows) entries.

Every tensor a codec writes is stored (`soft_labels.<part>`) and counted in the budget; `decode_soft_labels` is the
only reader: evaluate trains on what it returns, and materialize and budget read files through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .errors import UserError

PREFIX = "soft_labels"
CODEC_HELP = ("soft-label codec: fp32, fp16, int8 (per-row affine), topk:K (the K largest logits + their class "
              "indices, the rest one per-row fill value) or vq:K (a K-entry k-means codebook, one index per patch)")
_KINDS = ("fp32", "fp16", "int8", "topk", "vq")
_RAW = {"fp32": torch.float32, "fp16": torch.float16}
_SHARED_PARTS = ("codebook",)  # parts not indexed by row (every other part's leading dims are the rows')
VQ_SEED = 0  # the k-means++ start: a fixed seed, so one set of logits always gives one codebook
VQ_MAX_ITERS = 100


@dataclass(frozen=True)
class LabelCodec:
    """A parsed `--label-codec`: kind and, for topk/vq, K."""

    kind: str
    k: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind in ("topk", "vq") else self.kind

    @property
    def per_row(self) -> bool:
        """Whether a row's code depends on that row alone (every codec but vq, whose codebook is the set's)."""
        return self.kind != "vq"


def parse_codec(text: str, num_classes: int | None = None, flag: str = "--label-codec") -> LabelCodec:
    """`fp16` / `topk:3` / ... as a LabelCodec; a UserError for anything else, or a top-k wider than the classes."""
    raw = str(text).strip().lower()
    kind, sep, k_text = raw.partition(":")
    if kind not in _KINDS or (kind in ("topk", "vq")) != bool(sep):
        raise UserError(f"{flag} {text!r} is not a label codec; give {CODEC_HELP.split(': ', 1)[1]}")
    if not sep:
        return LabelCodec(kind)
    if not k_text.isdigit() or int(k_text) < 1:
        raise UserError(f"{flag} {text!r}: K must be a whole number of at least 1, e.g. {kind}:3")
    codec = LabelCodec(kind, int(k_text))
    if kind == "topk" and num_classes is not None and codec.k > num_classes:
        raise UserError(f"{flag} {text!r}: K = {codec.k} is more than the {num_classes} classes; pass at most "
                        f"topk:{num_classes}")
    return codec


def _index_dtype(n: int, small: bool = False) -> torch.dtype:
    """The narrowest integer dtype that holds 0..n-1 (uint8 only where `small` allows it)."""
    if small and n <= 256:
        return torch.uint8
    return torch.int16 if n <= 32767 else torch.int32


def planned_bytes(codec: LabelCodec, rows: int, num_classes: int, prefix: str = PREFIX) -> dict[str, int]:
    """Bytes of every tensor `encode_labels` writes for `rows` rows of `num_classes` logits, known before compute."""
    c, n = num_classes, rows
    if codec.kind in _RAW:
        return {prefix: n * c * _RAW[codec.kind].itemsize}
    if codec.kind == "int8":
        return {f"{prefix}.values": n * c, f"{prefix}.scale": n * 2, f"{prefix}.offset": n * 2}
    if codec.kind == "topk":
        return {f"{prefix}.values": n * codec.k * 2, f"{prefix}.indices": n * codec.k * _index_dtype(c).itemsize,
                f"{prefix}.fill": n * 2}
    entries = min(codec.k, max(n, 1))
    return {f"{prefix}.codebook": entries * c * 2, f"{prefix}.codes": n * _index_dtype(entries, small=True).itemsize}


def encode_labels(logits: torch.Tensor, codec: LabelCodec, prefix: str = PREFIX) -> tuple[dict, dict[str, str]]:
    """Logits (..., C) -> (stored tensors, metadata strings); the leading dims are the rows (per patch)."""
    x = logits.detach().float().cpu()
    lead, c = tuple(x.shape[:-1]), int(x.shape[-1])
    if codec.kind == "topk" and codec.k > c:
        raise UserError(f"--label-codec {codec}: K = {codec.k} is more than the {c} classes")
    meta = {"label_kind": "logits", "label_codec": str(codec), "label_shape": json.dumps([*lead, c])}
    if codec.kind in _RAW:
        meta["label_dtype"] = codec.kind  # what readers before the codecs looked for
        return {prefix: x.to(_RAW[codec.kind])}, meta
    rows = x.reshape(-1, c)  # (n, C)
    if codec.kind == "int8":
        lo, hi = rows.min(-1).values, rows.max(-1).values  # (n,)
        scale = ((hi - lo) / 255.0).clamp_min(1e-6).to(torch.float16)
        offset = lo.to(torch.float16)
        q = torch.round((rows - offset.float()[:, None]) / scale.float()[:, None]).clamp(0, 255) - 128
        parts = {"values": q.to(torch.int8), "scale": scale, "offset": offset}
    elif codec.kind == "topk":
        values, indices = rows.topk(codec.k, dim=-1)  # (n, K) each, largest first
        rest = c - codec.k
        fill = (rows.sum(-1) - values.sum(-1)) / rest if rest else values[:, -1]  # mean of the logits dropped
        parts = {"values": values.to(torch.float16), "indices": indices.to(_index_dtype(c)),
                 "fill": fill.to(torch.float16)}
    else:
        codebook = _kmeans(rows - rows.mean(-1, keepdim=True), codec.k).to(torch.float16)  # (K', C)
        codes = _nearest(rows - rows.mean(-1, keepdim=True), codebook.float())  # to the entries as stored
        parts = {"codebook": codebook, "codes": codes.to(_index_dtype(len(codebook), small=True))}
    tensors = {f"{prefix}.{name}": t if name in _SHARED_PARTS else t.reshape(*lead, *t.shape[1:])
               for name, t in parts.items()}
    return tensors, meta


def decode_soft_labels(tensors: dict[str, torch.Tensor], meta: dict[str, str],
                       prefix: str = PREFIX) -> torch.Tensor | None:
    """The stored soft labels as float32 logits of their stored shape (..., C), or None when the file has none.

    The one decoder: evaluate trains on it, materialize writes it out, budget reads it.
    """
    codec_text = meta.get("label_codec")
    if codec_text is None:  # files from before the codecs: one raw tensor
        return tensors[prefix].float() if prefix in tensors else None
    codec = parse_codec(codec_text, flag="label_codec in the labels file")
    shape = json.loads(meta["label_shape"])
    lead, c = shape[:-1], shape[-1]
    if codec.kind in _RAW:
        return tensors[prefix].float().reshape(shape)
    part = {name[len(prefix) + 1 :]: t for name, t in tensors.items() if name.startswith(prefix + ".")}
    if codec.kind == "int8":
        q = part["values"].reshape(-1, c).float() + 128
        rows = q * part["scale"].reshape(-1, 1).float() + part["offset"].reshape(-1, 1).float()
    elif codec.kind == "topk":
        values = part["values"].reshape(-1, codec.k).float()
        indices = part["indices"].reshape(-1, codec.k).long()
        rows = part["fill"].reshape(-1, 1).float().expand(-1, c).clone()
        rows.scatter_(1, indices, values)
    else:
        rows = part["codebook"].float()[part["codes"].reshape(-1).long()]
    return rows.reshape(*lead, c)


def label_parts(tensors: dict[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The stored tensors of the soft labels (every part of the codec), by their names in the file."""
    return {k: v for k, v in tensors.items() if k == prefix or k.startswith(prefix + ".")}


def take_rows(tensors: dict[str, torch.Tensor], meta: dict[str, str], index: torch.Tensor, prefix: str = PREFIX,
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rows `index` of the flattened leading dims of stored labels, still encoded: (tensors (len(index), ...), meta).

    A vq codebook is kept whole; every other part is indexed by row, so decode(take_rows(x)) == decode(x)[index].
    """
    codec_text = meta.get("label_codec") or meta.get("label_dtype") or "fp32"
    shape = json.loads(meta["label_shape"]) if "label_shape" in meta else list(tensors[prefix].shape)
    lead = shape[:-1]
    out = {}
    for name, t in label_parts(tensors, prefix).items():
        if name.rpartition(".")[2] in _SHARED_PARTS:
            out[name] = t
        else:
            out[name] = t.reshape(-1, *t.shape[len(lead) :])[index]
    new_meta = {"label_kind": "logits", "label_codec": codec_text, "label_shape": json.dumps([len(index), shape[-1]])}
    return out, new_meta


def _nearest(rows: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean, float64) of every row: (n,)."""
    c64 = centroids.double()
    c_norm = (c64 * c64).sum(-1)  # (K,)
    out = []
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk].double()
        d = c_norm[None, :] - 2 * r @ c64.T  # (b, K): |r|^2 is the same for every centroid
        out.append(d.argmin(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _kmeans(rows: torch.Tensor, k: int) -> torch.Tensor:
    """k-means centroids (min(k, n), C) of `rows` (n, C): k-means++ start from `VQ_SEED`, Lloyd steps in float64."""
    x = rows.double()
    n = len(x)
    k = min(k, n)
    g = torch.Generator().manual_seed(VQ_SEED)
    centroids = [x[int(torch.randint(n, (1,), generator=g))]]
    closest = ((x - centroids[0]) ** 2).sum(-1)  # (n,) squared distance to the nearest chosen centroid
    for _ in range(1, k):
        if float(closest.sum()) <= 0:  # every row already sits on a centroid: take the next row not yet chosen
            pick = len(centroids) % n
        else:
            pick = int(torch.multinomial(closest, 1, generator=g))
        centroids.append(x[pick])
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(-1))
    c = torch.stack(centroids)  # (k, C)
    assign = _nearest(x, c)
    for _ in range(VQ_MAX_ITERS):
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).double()
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)  # an empty cluster stays put
        new = _nearest(x, c)
        if torch.equal(new, assign):
            break
        assign = new
    return c.float()

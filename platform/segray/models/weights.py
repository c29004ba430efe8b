"""Load backbone weights from files (local or ``s3://``), strictly, with a report and a checksum.

Weights are files with provenance, never URLs fetched at run time: a timm classifier checkpoint
(``torch.save(model.state_dict())``, optionally wrapped in ``{"state_dict": ...}`` or
``{"model": ...}``, or a ``.safetensors`` file) is matched to a ``features_only`` encoder.

Matching rules, in order, for each encoder key:

- the file's keys are looked at under each of ``prefix_candidates`` (``encoder.``, ``backbone.``...)
  and the prefix matching the most encoder keys wins;
- encoder keys are tried as they are and without their wrapper prefixes (``body.`` of
  :class:`~segray.models.encoder.TimmEncoder`, ``model.`` of timm's getter-based feature nets);
- timm's feature wrappers flatten top-level sequentials (``stages.0`` becomes ``stages_0``), so
  keys also match when they agree with every ``.`` read as ``_``.

File keys that match nothing (the classifier ``fc.*``/``head.*``/``classifier.*`` and the final
norm or conv that ``features_only`` drops) are listed as unexpected, never loaded. Missing keys are
errors unless allowed; so is any shape mismatch.
"""

from __future__ import annotations

import fnmatch
import io
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import torch
from torch import nn

from segray import storage

DEFAULT_PREFIXES = ("", "encoder.", "backbone.", "model.")
#: Prefixes an encoder module may put in front of the names the timm model itself uses.
_WRAPPER_PREFIXES = ("body.model.", "body.", "model.")


@dataclass
class LoadReport:
    """What :func:`load_encoder_weights` did, to be saved in the run folder.

    Attributes:
        file: the URI the weights came from.
        sha256: hex SHA-256 of the file's bytes.
        loaded: number of tensors copied into the encoder.
        missing: encoder keys absent from the file that ``allow_missing`` allowed.
        unexpected: file keys not used (classifier head, layers ``features_only`` drops...).
        prefix: the file-key prefix that was stripped.
    """

    file: str
    sha256: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    prefix: str = ""

    def summary(self) -> str:
        """One human-readable paragraph, e.g. for the run log."""
        lines = [
            f"loaded {self.loaded} tensors from {self.file} (sha256 {self.sha256[:12]}…"
            + (f", prefix {self.prefix!r}" if self.prefix else "")
            + ")"
        ]
        if self.missing:
            lines.append(f"allowed missing ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            lines.append(f"unused file keys ({len(self.unexpected)}): {_short(self.unexpected)}")
        return "\n".join(lines)


def _short(keys: list[str], n: int = 8) -> str:
    more = f", … {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_state_dict(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read a state dict file and return it with the SHA-256 of its bytes.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: the file holds no mapping of names to tensors.
        ImportError: a ``.safetensors`` file without the ``safetensors`` package.
    """
    data = storage.read_bytes(uri)
    digest = storage.sha256(data)
    if PurePosixPath(str(uri)).suffix == ".safetensors":
        from safetensors.torch import load as load_safetensors

        obj = load_safetensors(data)
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for non-checkpoints
            raise ValueError(
                f"cannot read {uri} as a PyTorch checkpoint with weights_only=True: {e}; "
                "save it with torch.save(model.state_dict(), path)"
            ) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{uri} holds no state dict (a mapping of parameter names to tensors, possibly under "
            f"'state_dict' or 'model'); got {type(obj).__name__}"
        )
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, digest


def _flat(key: str) -> str:
    return key.replace(".", "_")


def _match(target_keys: list[str], file_keys: dict[str, str]) -> dict[str, str]:
    """Map each encoder key to a file key (``file_keys``: stripped name -> original name)."""
    by_flat: dict[str, str | None] = {}
    for name, original in file_keys.items():
        # Two file keys reading the same with '.' as '_' are ambiguous: match neither that way.
        by_flat[_flat(name)] = None if _flat(name) in by_flat else original
    matches: dict[str, str] = {}
    for t in target_keys:
        forms = [t] + [t[len(p) :] for p in _WRAPPER_PREFIXES if t.startswith(p)]
        for form in forms:
            if form in file_keys:
                matches[t] = file_keys[form]
                break
        else:
            for form in forms:
                if by_flat.get(_flat(form)):
                    matches[t] = by_flat[_flat(form)]
                    break
    return matches


def load_encoder_weights(
    encoder_module: nn.Module,
    uri: str,
    *,
    allow_missing: tuple[str, ...] = (),
    prefix_candidates: tuple[str, ...] = DEFAULT_PREFIXES,
) -> LoadReport:
    """Copy a checkpoint file's tensors into an encoder, strictly, and report what happened.

    Args:
        encoder_module: the encoder (a :class:`~segray.models.encoder.TimmEncoder` or any module).
        uri: local path or ``s3://`` URI of the weights file.
        allow_missing: fnmatch patterns of encoder keys that may be absent from the file
            (e.g. ``("*num_batches_tracked",)``).
        prefix_candidates: prefixes the file's keys may carry; the one matching most keys is used.

    Returns:
        A :class:`LoadReport` with the file's SHA-256.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: encoder keys missing from the file (listed), or shapes that differ (key and
            both shapes named).

    Example:
        >>> enc = TimmEncoder("resnet18")
        >>> torch.save(timm.create_model("resnet18").state_dict(), "/tmp/r18.pth")
        >>> load_encoder_weights(enc, "/tmp/r18.pth").unexpected
        ['fc.weight', 'fc.bias']
    """
    state, digest = read_state_dict(uri)
    target = encoder_module.state_dict()
    target_keys = list(target)

    best: tuple[str, dict[str, str]] | None = None
    for prefix in prefix_candidates:
        view = {k[len(prefix) :]: k for k in state if k.startswith(prefix)}
        matches = _match(target_keys, view)
        if best is None or len(matches) > len(best[1]):
            best = (prefix, matches)
    prefix, matches = best if best is not None else ("", {})

    missing = [k for k in target_keys if k not in matches]
    not_allowed = [k for k in missing if not any(fnmatch.fnmatch(k, p) for p in allow_missing)]
    if not_allowed:
        raise ValueError(
            f"{uri}: {len(not_allowed)} encoder keys are missing from the file: "
            f"{_short(not_allowed, 20)}. Check that the file is for this backbone (tried key "
            f"prefixes {list(prefix_candidates)}), or allow them with allow_missing=(pattern, ...)"
        )
    mismatched = [
        f"{t} (file key {f!r}): file {tuple(state[f].shape)} vs encoder {tuple(target[t].shape)}"
        for t, f in matches.items()
        if state[f].shape != target[t].shape
    ]
    if mismatched:
        raise ValueError(
            f"{uri}: shape mismatch for {len(mismatched)} keys: {'; '.join(mismatched[:10])}. "
            "The file was saved from a different variant of the backbone (width, depth, in_chans)"
        )

    encoder_module.load_state_dict({t: state[f] for t, f in matches.items()}, strict=False)
    used = set(matches.values())
    return LoadReport(
        file=str(uri),
        sha256=digest,
        loaded=len(matches),
        missing=missing,
        unexpected=[k for k in state if k not in used],
        prefix=prefix,
    )

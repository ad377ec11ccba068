"""Pretrained timm backbones behind redex's interface; never random weights, never silently.

Weights come the way timm gets them (`timm.create_model(name, pretrained=True)`, which goes through
`huggingface_hub` into the Hugging Face cache), or from a local file (`--checkpoint PATH`):

- the default pretrained tag's file already in the HF cache (`HF_HOME`, `HF_HUB_CACHE`) is used from
  there, with no network call, whether or not `HF_HUB_OFFLINE` is set;
- otherwise it is downloaded into the cache, unless `HF_HUB_OFFLINE=1` (as huggingface_hub honours it)
  or the Hub cannot be reached; one HEAD request with a short timeout (`HF_HUB_ETAG_TIMEOUT`, default
  5 s here, no retries) tells, so a machine without a network is told at once, before any job starts,
  with the command that fetches the weights elsewhere;
- a model with no pretrained weights at all is refused with that reason.

`pretrained_weights` says where a model's weights are (or why they cannot be had), `check_available`
refuses before a job starts, `backbone_choices` is what the Datasets page offers, and `load_timm`
builds the model. A pretrained backbone reads images at its pretrained config
(`timm.data.resolve_model_data_config`: size, crop_pct, interpolation, mean/std) through timm's eval
transform: `ImageReader` decodes source files (`core.data.decode.open_image`; a JPEG at the smallest DCT
scale that keeps the size the transform resizes to) in
DataLoader worker processes, and `embed_images` runs the model over them. On a Ray cluster the same
reading is split at the transform's tensor step (`input_reader`): a CPU task opens each file the same way
and runs the transform's PIL steps (resize, crop) to uint8 pixels at the input size, and the model's
actor does the rest (`embed_inputs`: ToTensor's /255 and the mean/std, then the model), which gives the
same floats as the whole transform here.
"""
from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core import paths
from core.data.decode import BadImage, open_image
from core.device import autocast, pick_device
from core.training.checkpoints import read_weights

DEFAULT_PROBE_TIMEOUT_S = 5.0   # the Hub reachability probe; HF_HUB_ETAG_TIMEOUT overrides it
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's load_state_dict_from_hf tries
SUGGESTED_TIMM = ("resnet18", "resnet50", "convnext_tiny", "vit_small_patch16_224")  # offered by the page


class BackboneUnavailable(RuntimeError):
    """No weights could be found for a pretrained backbone."""


def check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint} (all names: timm.list_models())")
    arch, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(name):
        tags = [m.partition(".")[2] for m in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(f"timm has no pretrained tag {tag!r} for {arch!r}; its tags: {', '.join(tags) or 'none'}"
                         f" (timm:{arch} takes the default one)")


# -- where the weights are ---------------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    """Where the default pretrained weights of timm model `name` are, or why they cannot be had here."""
    name: str
    can_run: bool
    reason: str                 # one line: where they are, or why not and what to do
    repo: str = ""              # 'timm/resnet18.a1_in1k' (a Hub repository) or the URL of the file
    path: Path | None = None    # the local file (HF or torch-hub cache), when cached
    tag: str = ""               # the pretrained tag, e.g. 'a1_in1k'

    @property
    def revision(self) -> str:
        """The cached snapshot's commit (HF cache: `.../snapshots/<commit>/<file>`), else ''."""
        if self.path is None or self.path.parent.parent.name != "snapshots":
            return ""
        return self.path.parent.name


def hub_cache() -> Path:
    """The Hugging Face cache this process uses (`HF_HUB_CACHE`, else `HF_HOME/hub`)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """`HF_HUB_OFFLINE=1` (read by huggingface_hub when it is imported)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def probe_timeout() -> float:
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_PROBE_TIMEOUT_S)


def fetch_command(name: str) -> str:
    """The shell command that puts `name`'s default pretrained weights in the HF cache of a machine with a network."""
    return f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""


def pretrained_weights(name: str, *, probe: bool = True, memo: dict | None = None) -> Weights:
    """Where timm model `name`'s default pretrained weights are: the HF cache (or torch-hub cache for the
    few models with a URL only), else the Hub when it answers (`probe`: one HEAD request, short timeout,
    no retries; `memo` shares a failed probe between calls). Never downloads."""
    from timm.models import get_pretrained_cfg

    check_timm_name(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return Weights(name, False, f"timm has no pretrained weights for {name!r} (tag "
                       f"{getattr(cfg, 'tag', None) or 'none'}; timm.list_models(pretrained=True) lists the models"
                       " that have them): it would run with random weights, which redex never does; pass"
                       " --checkpoint PATH with weights trained elsewhere")
    tag = cfg.tag or ""
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else list(HF_WEIGHT_FILES)
        found = _in_hf_cache(repo, files, revision or None)
        if found:
            return Weights(name, True, f"weights in the HF cache ({repo})", repo, found, tag)
        where = f"not in the HF cache ({hub_cache()})"
    else:
        repo, revision, files = cfg.url, "", []
        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if local.is_file():
            return Weights(name, True, f"weights in the torch hub cache ({local})", repo, local, tag)
        where = f"not in the HF cache nor the torch hub cache ({local})"
    why = _cannot_download(repo, files, revision, probe=probe, memo=memo)
    if why is None:
        server = "the Hugging Face Hub" if cfg.hf_hub_id else "their URL"
        return Weights(name, True, f"weights {where}: they will be downloaded from {server} ({repo}) when the"
                       " job starts", repo, None, tag)
    return Weights(name, False, f"weights of timm:{name} ({repo}) are {where} and {why}: {_how_to_fetch(name, repo)}",
                   repo, None, tag)


def check_available(name: str) -> Weights:
    """`pretrained_weights(name)`, or `BackboneUnavailable` with its reason when they cannot be had here."""
    weights = pretrained_weights(name)
    if not weights.can_run:
        raise BackboneUnavailable(weights.reason)
    return weights


def _how_to_fetch(name: str, repo: str) -> str:
    """What to do on a machine without the weights: the command that fetches them elsewhere, where to copy
    them here, or a local file."""
    if "://" in repo:  # torch hub's cache, not Hugging Face's
        copy = (f"copy {os.path.basename(repo)} from its torch hub cache (~/.cache/torch/hub/checkpoints) into"
                f" {Path(torch.hub.get_dir()) / 'checkpoints'} here")
    else:
        copy = (f"copy its HF cache folder (models--{repo.replace('/', '--')} under ~/.cache/huggingface/hub)"
                f" into {hub_cache()} here")
    return (f"on a machine with a network run `{fetch_command(name)}`, then {copy}; or give a local weights file"
            f" with --checkpoint PATH (the page's Checkpoint file)")


def _in_hf_cache(repo: str, files: Sequence[str], revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        found = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _cannot_download(repo: str, files: Sequence[str], revision: str, *, probe: bool, memo: dict | None) -> str | None:
    """None when the weights can be downloaded now, else why not (offline, or the Hub does not answer)."""
    if offline():
        return "HF_HUB_OFFLINE=1 forbids downloading them"
    if not probe:
        return None
    memo = {} if memo is None else memo
    if "unreachable" in memo and "://" not in repo:
        return memo["unreachable"]
    try:
        _probe(repo, files, revision)
    except _Unreachable as exc:
        why = f"{'their URL' if '://' in repo else 'the Hugging Face Hub'} cannot be reached ({exc})"
        if "://" not in repo:  # a Hub that does not answer for one model does not for the next
            memo["unreachable"] = why
        return why
    except _Refused as exc:
        return f"the Hub refuses them ({exc})"
    return None


class _Unreachable(Exception):
    pass


class _Refused(Exception):
    pass


def _probe(repo: str, files: Sequence[str], revision: str) -> None:
    """One HEAD request per candidate file, `probe_timeout()` seconds, no retries: returns when one exists."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import get_session

    timeout = probe_timeout()
    try:
        if "://" in repo:  # a model with a URL only: timm fetches it with torch.hub
            status = get_session().head(repo, timeout=timeout, follow_redirects=True).status_code
            if status >= 400:
                raise (_Refused if status < 500 else _Unreachable)(f"HTTP {status} from {repo}")
            return
        for filename in files:
            try:
                get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision or None), timeout=timeout)
                return
            except EntryNotFoundError:
                continue
    except (_Refused, _Unreachable):
        raise
    except RepositoryNotFoundError as exc:  # gated, private or gone
        raise _Refused(_first_line(exc)) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", 0) or 0
        raise (_Refused if 400 <= status < 500 else _Unreachable)(_first_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - connection errors of huggingface_hub's HTTP client, DNS, timeouts
        raise _Unreachable(f"{type(exc).__name__}: {_first_line(exc)}") from None
    raise _Refused(f"no weights file ({', '.join(files)}) in {repo}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# -- what the Datasets page offers -------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    spec: str       # 'trained:resnet8s2', 'timm:resnet18'
    can_run: bool
    reason: str


def backbone_choices(extra: Iterable[str] = (), *, probe: bool = True) -> list[Choice]:
    """Backbones to offer: every trained architecture, the suggested timm models, every timm model whose
    weights are in the HF cache, and `extra` timm names; each with whether it can run here now, and why
    (not). Trained ones first (the default first), then the timm ones in that order. At most one
    failed network probe (shared); no download."""
    from core.embed.backbones import DEFAULT_BACKBONE, list_archs

    trained = [DEFAULT_BACKBONE] + [f"trained:{a}" for a in list_archs() if f"trained:{a}" != DEFAULT_BACKBONE]
    choices = [Choice(s, True, "trained here on the dataset's own train split"
                      + (" (the default, the paper's way)" if s == DEFAULT_BACKBONE else "")) for s in trained]
    memo: dict = {}
    for name in dict.fromkeys([*cached_timm_models(), *SUGGESTED_TIMM, *extra]):
        try:
            weights = pretrained_weights(name, probe=probe, memo=memo)
        except ValueError as exc:  # an unknown name
            choices.append(Choice(f"timm:{name}", False, str(exc)))
            continue
        choices.append(Choice(f"timm:{name}", weights.can_run, weights.reason))
    return choices


def cached_timm_models() -> list[str]:
    """timm models whose default pretrained weights are in the HF cache, as timm names: 'resnet18' when
    the cached tag is the default one, 'resnet18.tv_in1k' otherwise. Sorted."""
    import timm
    from timm.models import get_pretrained_cfg

    names = []
    root = hub_cache()
    for folder in sorted(root.glob("models--timm--*")) if root.is_dir() else []:
        full = folder.name.removeprefix("models--timm--")
        arch = full.partition(".")[0]
        if full not in timm.list_pretrained(full):  # a tag this timm does not know
            continue
        default = get_pretrained_cfg(arch)
        name = arch if default is not None and default.hf_hub_id == f"timm/{full}" else full
        if pretrained_weights(name, probe=False).path is not None:
            names.append(name)
    return names


# -- the model ---------------------------------------------------------------------------------
class TimmBackbone(nn.Module):
    """A timm model behind redex's interface: pooled pre-logits features `[N, embed_dim]`.

    - `transform`: timm's eval transform at the pretrained config (PIL image -> normalised `[3, H, W]`);
      `features(x)` takes a batch of those. This is how `embed_images` reads images.
    - `forward_features(x)` also takes raw pixels `[N, C, H, W]` (0..255, C = 1 or 3): 3 channels,
      resized to the input size, normalised with the model's mean/std (a tensor path for callers that
      only have pixel arrays).
    - `weights`: where the weights came from (HF repo and revision, torch hub file, or a checkpoint
      digest), for the backbone id.
    """

    def __init__(self, model: nn.Module, name: str, weights: str = ""):
        super().__init__()
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        self.model = model
        self.name = name
        self.weights = weights
        self.data_config = dict(cfg)
        self.transform = timm.data.create_transform(**cfg, is_training=False)
        self.embed_dim = model.num_features
        self.input_size = tuple(cfg["input_size"][1:])
        # the short side timm's eval transform resizes to (centre crop of input_size at crop_pct): a JPEG
        # larger than twice this is decoded at a reduced scale, never below it (`ImageReader`)
        self.decode_side = int(math.floor(max(self.input_size) / cfg.get("crop_pct", 1.0)))
        self.interpolation = cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic") else "bilinear"
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, 1|3, H, W]` 0..255 -> `[N, 3, *input_size]` normalised float."""
        x = x.to(self.mean.dtype) / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False,
                              antialias=x.shape[-1] > self.input_size[-1]).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, 3, H, W]` already through `transform` -> `[N, embed_dim]`."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def load_timm(name: str, checkpoint: str | Path | None = None, *,
              log: Callable[[str], None] | None = None) -> TimmBackbone:
    """A pretrained timm model (classifier dropped, eval mode) from `checkpoint` (a local state dict) or
    from its default pretrained tag: the HF cache when it holds the weights (no network), else a
    download into it (timm's own `pretrained=True`). Never random weights: raises `BackboneUnavailable`
    with the reason and what to do."""
    check_timm_name(name)
    if checkpoint is not None:
        return _from_checkpoint(name, Path(checkpoint).expanduser())
    weights = check_available(name)
    if weights.path is None:
        if log:
            log(f"downloading the weights of timm:{name} ({weights.repo}) into the HF cache {hub_cache()}")
        model = _create_pretrained(name, None, weights)
        weights = pretrained_weights(name, probe=False)  # now cached: its revision goes into the id
    else:
        model = _create_pretrained(name, weights.path, weights)
    source = f"{weights.repo}@{weights.revision}" if weights.revision else str(weights.path or weights.repo)
    return TimmBackbone(model, name, weights=source).eval()


def _create_pretrained(name: str, path: Path | None, weights: Weights) -> nn.Module:
    """timm's own pretrained loading: from the cached `path` (`pretrained_cfg_overlay=dict(file=...)`,
    no network) or, without one, from the Hub into the HF cache. The classifier keeps its pretrained
    shape so the load is strict (a file that does not fit fails), then it is dropped."""
    import timm

    overlay = {"file": str(path)} if path is not None else None
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - network, hub and file errors all end here, with the reason
        got = "read" if path is not None else "downloaded"
        raise BackboneUnavailable(
            f"the weights of timm:{name} ({path or weights.repo}) could not be {got}: {type(exc).__name__}:"
            f" {_first_line(exc)}; {_how_to_fetch(name, weights.repo)}") from None
    model.reset_classifier(0)
    return model


def _from_checkpoint(name: str, path: Path) -> TimmBackbone:
    import timm

    if not path.exists():
        raise BackboneUnavailable(
            f"no pretrained weights for timm model {name!r}: checkpoint {path} (no such file). Supply a local"
            f" weights file with --checkpoint PATH (a .safetensors or .pth state dict for {name!r}), or leave"
            f" it out to use the default pretrained weights from the HF cache")
    paths.regular_file(path, "checkpoint")  # a folder, a FIFO, a device: refused before opening
    model = timm.create_model(name, pretrained=False, num_classes=0)
    _load_body(model, _read_state_dict(path), name, path)
    return TimmBackbone(model, name, weights=f"checkpoint:{paths.file_digest(path, 'checkpoint')}").eval()


def check_checkpoint(name: str, checkpoint: str | Path) -> None:
    """Refuse, with the reason, a weights file that `load_timm(name, checkpoint)` could not use, before a
    job starts: not a regular file, not a state dict `torch.load(weights_only=True)` can read, or
    tensors whose names or shapes do not match timm model `name` (built on the meta device, no memory)."""
    import timm

    check_timm_name(name)
    path = Path(checkpoint).expanduser()
    paths.regular_file(path, "checkpoint")
    state = _read_state_dict(path)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})" for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise BackboneUnavailable(f"{path} does not hold weights for timm model {name!r}: shapes differ: "
                                  f"{', '.join(wrong[:3])}")
    _check_keys(model, [k for k in expected if k not in state], [k for k in state if k not in expected], name, path)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch file (`weights_only=True`), unwrapped.
    `ValueError` with the reason for a file that is neither (garbage, truncated, a pickle of objects)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = read_weights(path)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc):
            reason = "it holds Python objects besides tensors, which are never loaded (weights_only=True)"
        raise ValueError(f"{path}: not a weights file that can be loaded safely (.safetensors, or a"
                         f" PyTorch state dict): {reason}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a dict of tensors)")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _load_body(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """Load every non-classifier weight strictly; classifier weights in `state` are ignored."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise BackboneUnavailable(f"{path} does not hold weights for timm model {name!r}: "
                                  f"{' '.join(str(exc).split())[:400]}") from None
    _check_keys(model, result.missing_keys, result.unexpected_keys, name, path)


def _check_keys(model: nn.Module, missing: list[str], unexpected: list[str], name: str, path: Path) -> None:
    """Every body weight present, nothing unknown besides the classifier's."""
    head = model.pretrained_cfg.get("classifier") or "head"
    heads = head if isinstance(head, (list, tuple)) else [head]
    unexpected = [k for k in unexpected if not any(k.startswith(h + ".") for h in heads)]
    if missing or unexpected:
        raise BackboneUnavailable(
            f"{path} does not hold weights for timm model {name!r}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


# -- reading images at the pretrained config ---------------------------------------------------
class ImageReader(torch.utils.data.Dataset):
    """Images through a backbone's `transform`; item i is `(i, tensor [3, H, W], None)` or, for an image
    that cannot be read, `(i, None, reason)`.

    From source files (`files`, each read by `open_image`: upright, checked; a JPEG at a reduced DCT scale
    that keeps `min_side` px on its short side, `TimmBackbone.decode_side`: 3.8x faster on 3-9 Mpx photos)
    or, for a dataset with no file of its own per image, from pixel arrays `pixels [N, S, S, C]` at their size.
    """

    def __init__(self, transform: Callable, *, files: Sequence[Path] | None = None,
                 pixels: np.ndarray | None = None, min_side: int | None = None):
        if (files is None) == (pixels is None):
            raise ValueError("give either files or pixels")
        self.transform, self.files, self.pixels, self.min_side = transform, files, pixels, min_side

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.pixels)

    def __getitem__(self, i: int):
        try:
            if self.files is not None:
                im = open_image(self.files[i], self.min_side)
            else:
                arr = np.asarray(self.pixels[i])
                im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            return i, self.transform(im.convert("RGB")), None
        except BadImage as exc:
            return i, None, str(exc)
        except (OSError, ValueError) as exc:  # decoded, but the transform could not use it
            return i, None, f"cannot be read: {_first_line(exc)}"


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(indices of the images read, `[B, 3, H, W]` of them, [(index, reason)] of the others)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, [(i, reason) for i, x, reason in items if x is None]


@dataclass(frozen=True)
class InputReader:
    """What a Ray cluster's CPU task does to give a backbone its input, the same as `ImageReader` here: open
    a source file upright (`open_image`, a JPEG at a reduced scale keeping `min_side`) or take a pixel-cache
    row, convert it to RGB and run `steps` on it. `steps` is the transform's PIL part (resize, centre crop):
    the result is uint8 [H, W, 3] at the input size, and `embed_inputs` does the tensor part on the model's
    worker. When the transform cannot be split so (`input_reader`), `steps` is the whole transform and the
    result is the float32 [3, H, W] the model takes. Raises `BadImage` with the reason `ImageReader` gives."""
    steps: Callable = field(repr=False)
    min_side: int | None
    whole: bool = False

    def file(self, path: Path, image_id: str | None = None) -> np.ndarray:
        """The input of source file `path` (`image_id` is not checked: the local reader does not either)."""
        return self._prepare(lambda: open_image(path, self.min_side))

    def array(self, pixels: np.ndarray) -> np.ndarray:
        """The input of a pixel-cache row uint8 [S, S, C] (a dataset with no file per image)."""
        arr = np.asarray(pixels)
        return self._prepare(lambda: Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr))

    def _prepare(self, image: Callable[[], Image.Image]) -> np.ndarray:
        try:
            out = self.steps(image().convert("RGB"))
        except BadImage:
            raise
        except (OSError, ValueError) as exc:  # decoded, but the transform could not use it
            raise BadImage(f"cannot be read: {_first_line(exc)}") from None
        return out.numpy() if self.whole else np.asarray(out, dtype=np.uint8)


def input_reader(model: TimmBackbone) -> tuple[InputReader, tuple[int, ...], str]:
    """(reader, shape, dtype) of what a cluster's CPU task makes of each image for `model`: uint8 [H, W, 3]
    when the transform ends in exactly ToTensor and Normalize with the model's own mean and std (every timm
    eval transform), so that `embed_inputs` redoes those two exactly; else float32 [3, H, W] through the
    whole transform (4x the bytes through the object store, the same result)."""
    from torchvision import transforms as T

    steps = list(getattr(model.transform, "transforms", []))
    h, w = model.input_size
    if len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize):
        norm = steps[-1]
        same = (torch.equal(torch.as_tensor(norm.mean, dtype=torch.float32).flatten(), model.mean.cpu().flatten())
                and torch.equal(torch.as_tensor(norm.std, dtype=torch.float32).flatten(), model.std.cpu().flatten()))
        pil = all(not isinstance(t, (T.ToTensor, T.PILToTensor, T.Normalize)) for t in steps[:-2])
        if same and pil:
            return InputReader(T.Compose(steps[:-2]), model.decode_side), (h, w, 3), "uint8"
    return InputReader(model.transform, model.decode_side, whole=True), (3, h, w), "float32"


@torch.inference_mode()
def embed_inputs(model: TimmBackbone, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """float32 `[n, embed_dim]` of inputs an `InputReader` made, on the model's device, `batch_size` at a
    time (the model actor's step on a Ray cluster): uint8 `[n, H, W, 3]` go through the transform's tensor
    step as ToTensor and Normalize compute it (/255, minus the mean, over the std); float32 `[n, 3, H, W]`
    went through the whole transform already. Eval mode, autocast on CUDA, as `embed_images`."""
    device = model.mean.device
    model.eval()
    out = []
    for lo in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[lo:lo + batch_size])).to(device)
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).to(torch.float32).div(255).sub(model.mean).div(model.std)
        with autocast(device):
            out.append(model.features(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)


def decode_workers() -> int:
    """DataLoader worker processes that decode images: `core.data.decode.decode_workers` keeping one CPU
    for the model (`REDEX_DECODE_WORKERS` overrides)."""
    from core.data.decode import decode_workers as workers

    return workers(reserve=1)


def embed_images(model: TimmBackbone, reader: ImageReader, *, batch_size: int = 64, num_workers: int | None = None,
                 device: torch.device | str | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """(float32 `[len(reader), embed_dim]`, {index: reason}): features of every image of `reader`, decoded
    in `num_workers` processes (default `decode_workers()`; 0: here), in order; the row of an image
    that could not be read is NaN and its reason is in the dict. Eval mode, no grad, autocast on CUDA."""
    device = torch.device(device) if device is not None else pick_device()
    workers = decode_workers() if num_workers is None else num_workers
    model.to(device).eval()
    out = np.full((len(reader), model.embed_dim), np.nan, dtype=np.float32)
    failed: dict[int, str] = {}
    loader = torch.utils.data.DataLoader(reader, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    for index, batch, bad in loader:
        failed.update(bad)
        if index:
            out[index] = _features(model, batch.to(device, non_blocking=True), device)
    return out, failed


@torch.inference_mode()
def _features(model: TimmBackbone, x: torch.Tensor, device: torch.device) -> np.ndarray:
    with autocast(device):
        return model.features(x).float().cpu().numpy()

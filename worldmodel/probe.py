"""Linear probes of the backbone's hidden states: what each block knows about the data's latent factors.

A miniature of the Self-Flow paper's representation figure. For a pretrained checkpoint (its EMA
weights), clean (or slightly noised) media go through the model once per batch; the media-token
output of every block is mean-pooled to one (D,) vector per sample. A linear classifier per
categorical label (held-out accuracy) and a ridge regression per continuous label (held-out R^2) are
fitted on standardised features of each block. Comparing Self-Flow with plain flow matching is one
line per checkpoint in the plot.

Captions state the labels, so the default text is the EMPTY caption (the unconditional input the model
saw under caption dropout); ``text="caption"`` would let the probe read labels from the text stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from worldmodel.data import collate
from worldmodel.tokens import TokenSequence

TEXT_MODES = ("empty", "caption", "none")
LOGISTIC_L2 = (1e-4, 1e-3, 1e-2)  # weight-decay grid of the linear classifiers (picked on a validation split)
RIDGE_ALPHA = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge grid, per training sample (picked on a validation split)


# ------------------------------------------------------------------------------------------ features

def sample_indices(length: int, num_samples: int, seed: int) -> list[int]:
    """``num_samples`` distinct dataset indices, a seeded random subset (folder datasets are sorted by class)."""
    if num_samples < 4:
        raise ValueError(f"num_samples={num_samples} is too few to fit and test a probe; use at least a few hundred")
    if num_samples > length:
        raise ValueError(f"num_samples={num_samples} exceeds the dataset's {length} samples; lower num_samples")
    return np.random.default_rng(seed).permutation(length)[:num_samples].tolist()


@torch.no_grad()
def extract_features(
    model: nn.Module,
    codec,
    dataset,
    modality: str,
    num_samples: int,
    tau: float = 0.0,
    blocks: Sequence[int] | None = None,
    text: str = "empty",
    text_encoder=None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[dict[int, Tensor], dict[str, Tensor]]:
    """Mean-pooled media-token hidden states of each block, and the samples' labels.

    model: a WorldModel (pass the EMA weights: what ``model.safetensors`` holds). codec: encode(media) ->
    (tokens (B, N, C), pos (N, 3)). dataset: map-style, samples ``{modality: media, "caption", "labels"}``.
    tau: flow time of every token (0 = clean data; a small value probes slightly noised inputs).
    blocks: block indices (None = all). text: "empty" (encoded "" caption, needs ``text_encoder``),
    "caption" (the sample's caption; leaks the labels), "none" (the model's learned null token).
    Returns ({block: (S, D) float32 CPU}, {label: (S,) int64 or float32 CPU}).
    """
    if text not in TEXT_MODES:
        raise ValueError(f"text={text!r} is not a probe text mode; use one of {', '.join(TEXT_MODES)}")
    if text != "none" and text_encoder is None:
        raise ValueError(f"text={text!r} needs the checkpoint's text_encoder; pass text_encoder=... or use text='none'")
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau={tau} must lie in [0, 1] (0 = clean data, 1 = pure noise)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    depth = model.num_blocks
    blocks = list(range(depth)) if blocks is None else sorted({int(b) for b in blocks})
    if not blocks or blocks[0] < 0 or blocks[-1] >= depth:
        raise ValueError(f"blocks {blocks} must be a non-empty subset of 0..{depth - 1}")
    model = model.eval()
    indices = sample_indices(len(dataset), int(num_samples), seed)
    generator = torch.Generator().manual_seed(seed)
    pooled: dict[int, list[Tensor]] = {b: [] for b in blocks}
    labels: dict[str, list[Tensor]] = {}
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start: start + batch_size]])
        if batch["modality"] != modality:
            raise ValueError(f"the probe dataset yields {batch['modality']!r} samples, not {modality!r}; "
                             "pass a dataset of the probed modality")
        if not batch["labels"]:
            raise ValueError("the probe dataset's samples carry no 'labels'; probe a labelled dataset "
                             "(the procedural sources, or an image folder with class sub-folders)")
        tokens, pos = codec.encode(batch[modality].to(device))  # (B, N, C), (N, 3)
        b, n, _ = tokens.shape
        if tau > 0:
            noise = torch.randn(tokens.shape, generator=generator).to(tokens)
            tokens = (1.0 - tau) * tokens + tau * noise  # x_t = (1 - t) x0 + t eps
        seq = TokenSequence(x=tokens, tau=torch.full((b, n), float(tau), device=device), pos=pos.to(device),
                            layout=((modality, n),), loss_mask=torch.zeros(b, n, dtype=torch.bool, device=device))
        if text != "none":
            captions = batch["caption"] if text == "caption" else [""] * b
            seq.text, seq.text_mask = text_encoder.encode(captions, device=device)  # (B, L, Dt), (B, L)
        out = model(seq, return_hidden=blocks, stop_after=blocks[-1])
        for block in blocks:
            pooled[block].append(out.hidden[block].float().mean(dim=1).cpu())  # (B, D)
        for name, value in batch["labels"].items():
            labels.setdefault(name, []).append(value)
    return {k: torch.cat(v) for k, v in pooled.items()}, {k: torch.cat(v) for k, v in labels.items()}


# ------------------------------------------------------------------------------------------- probes

@dataclass
class ProbeResult:
    """Held-out scores ``{block: {label: value}}``; ``metric[label]`` is "accuracy" or "r2"."""

    scores: dict[int, dict[str, float]]
    metric: dict[str, str]
    chance: dict[str, float]  # accuracy of the training majority class; 0 for R^2 (predicting the mean)
    n_train: int
    n_test: int
    meta: dict = field(default_factory=dict)

    def best(self, label: str) -> tuple[int, float]:
        """(block, score) of the best block for ``label``."""
        block = max(self.scores, key=lambda b: self.scores[b][label])
        return block, self.scores[block][label]

    def to_dict(self) -> dict:
        return {"scores": {str(b): s for b, s in self.scores.items()}, "metric": self.metric, "chance": self.chance,
                "n_train": self.n_train, "n_test": self.n_test, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> ProbeResult:
        return cls(scores={int(b): s for b, s in data["scores"].items()}, metric=data["metric"],
                   chance=data["chance"], n_train=data["n_train"], n_test=data["n_test"], meta=data.get("meta", {}))


def _standardise(x: Tensor, train: Tensor) -> Tensor:
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    return (x - mean) / std


def _fit_logistic(x: Tensor, y: Tensor, classes: int, l2: float, max_iter: int) -> Tensor:
    """Multinomial logistic regression by full-batch LBFGS; returns weights (D+1, K) (last row = bias)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # (n, D+1)
    w = torch.zeros(xb.shape[1], classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def _accuracy(x: Tensor, y: Tensor, w: Tensor) -> float:
    logits = x @ w[:-1] + w[-1]  # (n, K)
    return float((logits.argmax(1) == y).double().mean())


def _fit_ridge(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    """Ridge weights (D+1,) on centred data (last entry = bias); alpha is per training sample."""
    mx, my = x.mean(0), y.mean()
    xc = x - mx
    gram = xc.T @ xc + alpha * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, xc.T @ (y - my))  # (D,)
    return torch.cat([w, (my - mx @ w).reshape(1)])


def _r2(x: Tensor, y: Tensor, w: Tensor) -> float:
    pred = x @ w[:-1] + w[-1]
    total = (y - y.mean()).pow(2).sum().clamp_min(1e-12)
    return float(1.0 - (y - pred).pow(2).sum() / total)


def _select(fit, score, x: Tensor, y: Tensor, fit_idx: Tensor, val_idx: Tensor, grid) -> tuple[float, object]:
    """Pick the grid value with the best validation score, refit on fit+val; returns (value, weights)."""
    best = max(grid, key=lambda g: score(x[val_idx], y[val_idx], fit(x[fit_idx], y[fit_idx], g)))
    both = torch.cat([fit_idx, val_idx])
    return best, fit(x[both], y[both], best)


def fit_linear_probes(
    features: Mapping[int, Tensor],
    labels: Mapping[str, Tensor],
    train_frac: float = 0.8,
    seed: int = 0,
    num_classes: Mapping[str, int] | None = None,
    max_iter: int = 100,
) -> ProbeResult:
    """Fit one linear probe per (block, label) on a seeded train split and score it on the held-out rest.

    features: {block: (S, D)}. labels: {name: (S,)}; a label is categorical if it is in ``num_classes``
    or has an integer dtype (multinomial logistic regression, accuracy), else continuous (ridge, R^2).
    Features are standardised with train statistics; the L2 strength is chosen on a validation quarter
    of the train split. Deterministic for a given seed.
    """
    if not features or not labels:
        raise ValueError("fit_linear_probes needs at least one block of features and one label")
    sizes = {len(v) for v in features.values()} | {len(v) for v in labels.values()}
    if len(sizes) != 1:
        raise ValueError(f"features and labels disagree on the number of samples: {sorted(sizes)}")
    total = sizes.pop()
    n_train = int(round(train_frac * total))
    if not 0.0 < train_frac < 1.0 or n_train < 4 or total - n_train < 2:
        raise ValueError(f"train_frac={train_frac} of {total} samples leaves too few to train or test; "
                         "use 0 < train_frac < 1 and more samples")
    num_classes = dict(num_classes or {})
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    train, test = perm[:n_train], perm[n_train:]
    n_val = max(1, n_train // 4)
    fit_idx, val_idx = torch.arange(n_train - n_val), torch.arange(n_train - n_val, n_train)  # inside train

    metric, chance, targets = {}, {}, {}
    for name, value in labels.items():
        if name in num_classes or not value.is_floating_point():
            y = value.long()
            classes = max(int(num_classes.get(name, 0)), int(y.max()) + 1)
            if int(y.min()) < 0:
                raise ValueError(f"categorical label {name!r} has negative values; classes must be 0..K-1")
            majority = torch.bincount(y[train], minlength=classes).argmax()
            metric[name], chance[name], targets[name] = "accuracy", float((y[test] == majority).double().mean()), (
                y, classes)
        else:
            y = value.double()
            std = y[train].std().clamp_min(1e-12)
            metric[name], chance[name], targets[name] = "r2", 0.0, ((y - y[train].mean()) / std, None)

    scores: dict[int, dict[str, float]] = {}
    chosen: dict[str, dict[str, float]] = {}
    for block in sorted(features):
        x = _standardise(features[block].double(), train)  # (S, D)
        xtr, xte = x[train], x[test]
        row = {}
        for name, (y, classes) in targets.items():
            ytr, yte = y[train], y[test]
            if classes is not None:
                fit = lambda a, b, g, k=classes: _fit_logistic(a, b, k, g, max_iter)  # noqa: E731
                strength, w = _select(fit, _accuracy, xtr, ytr, fit_idx, val_idx, LOGISTIC_L2)
                row[name] = _accuracy(xte, yte, w)
            else:
                strength, w = _select(_fit_ridge, _r2, xtr, ytr, fit_idx, val_idx, RIDGE_ALPHA)
                row[name] = _r2(xte, yte, w)
            chosen.setdefault(str(block), {})[name] = strength
        scores[int(block)] = row
    return ProbeResult(scores, metric, chance, n_train, total - n_train, {"seed": seed, "l2": chosen})


# ----------------------------------------------------------------------------------------- checkpoints

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given it or a pretraining run directory that holds ``checkpoint/``."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / "checkpoint" / "config.json").exists():
        return path / "checkpoint"
    raise FileNotFoundError(f"no checkpoint at {path}: pass a checkpoint directory (with config.json) "
                            "or a pretraining run directory holding checkpoint/")


def probe_dataset(run: dict, modality: str, seed: int = 0):
    """The procedural dataset of a pretraining run's data config, with a generator seed it never trained on."""
    from worldmodel.data import ProceduralAudio, ProceduralImages, ProceduralVideos

    d = run.get("data", {})
    if d.get("name") != "procedural":
        raise ValueError(f"the checkpoint was pretrained on data={d.get('name')!r}; the default probe data is "
                         "procedural: pass dataset=... (a labelled dataset of the probed modality)")
    held_out = int(d.get("seed", 0)) + 1_000 + int(seed)  # a different generator seed: unseen samples
    if modality == "image":
        return ProceduralImages(size=int(d["image_size"]), length=int(d["length"]), seed=held_out)
    if modality == "video":
        return ProceduralVideos(size=int(d["video_size"]), frames=int(d["video_frames"]), length=int(d["length"]),
                                seed=held_out)
    if modality == "audio":
        return ProceduralAudio(sample_rate=int(d["sample_rate"]), seconds=float(d["audio_seconds"]),
                               length=int(d["length"]), seed=held_out)
    raise ValueError(f"cannot probe modality {modality!r}; use image, video or audio")


def probe_checkpoint(
    path: str | Path,
    modality: str = "image",
    num_samples: int = 1000,
    tau: float = 0.0,
    text: str = "empty",
    blocks: Sequence[int] | None = None,
    train_frac: float = 0.8,
    batch_size: int = 64,
    device: str = "cpu",
    seed: int = 0,
    dataset=None,
) -> ProbeResult:
    """Load a pretraining checkpoint (EMA weights), extract features of ``modality`` and fit the probes.

    ``dataset`` defaults to the run's procedural source with an unseen generator seed.
    """
    from worldmodel.builders import load_pretrained

    path = resolve_checkpoint(path)
    model, text_encoder, frame_codec, audio_codec, run = load_pretrained(path, device)
    codec = audio_codec if modality == "audio" else frame_codec
    dataset = dataset if dataset is not None else probe_dataset(run, modality, seed)
    features, labels = extract_features(model, codec, dataset, modality, num_samples, tau=tau, blocks=blocks,
                                        text=text, text_encoder=text_encoder, batch_size=batch_size, device=device,
                                        seed=seed)
    result = fit_linear_probes(features, labels, train_frac=train_frac, seed=seed,
                               num_classes=getattr(dataset, "num_classes", None))
    objective = run.get("objective", {})
    student = teacher = None
    if objective.get("name") == "selfflow":  # the blocks the representation loss aligned (defaults resolved)
        from worldmodel.builders import selfflow_config

        student, teacher = selfflow_config(objective, 0.0, False).blocks(model.num_blocks)
    result.meta.update(checkpoint=str(path), modality=modality, tau=float(tau), text=text, num_samples=num_samples,
                       objective=objective.get("name"), student_block=student, teacher_block=teacher,
                       model_size=run.get("model", {}).get("size"))
    return result


# ------------------------------------------------------------------------------------------- reports

def markdown_table(results: Mapping[str, ProbeResult]) -> str:
    """One table per label: rows = blocks, columns = checkpoints (accuracy or R^2 on held-out samples)."""
    names = list(results)
    first = results[names[0]]
    lines = []
    for label, metric in first.metric.items():
        lines += [f"### {label} ({metric}, chance {first.chance[label]:.3f})", "",
                  "| block | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for block in sorted(first.scores):
            cells = [f"{results[n].scores[block][label]:.3f}" if block in results[n].scores else "-" for n in names]
            lines.append(f"| {block} | " + " | ".join(cells) + " |")
        best = ", ".join(f"{n}: block {results[n].best(label)[0]} ({results[n].best(label)[1]:.3f})" for n in names)
        lines += ["", f"best: {best}", ""]
    return "\n".join(lines)


def plot_probes(results: Mapping[str, ProbeResult], path: str | Path, title: str | None = None) -> Path:
    """PNG of score vs block, one panel per label, one line per checkpoint, chance dashed; dotted / dash-dotted
    verticals at the first result's Self-Flow student / teacher blocks when its meta names them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    first = next(iter(results.values()))
    labels = list(first.metric)
    cols = min(4, len(labels))
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for name, res in results.items():
            blocks = sorted(res.scores)
            ax.plot(blocks, [res.scores[b][label] for b in blocks], marker="o", label=name)
        ax.axhline(first.chance[label], color="grey", linestyle="--", linewidth=1)
        for key, style in (("student_block", ":"), ("teacher_block", "-.")):  # Self-Flow's l and k, when known
            if first.meta.get(key) is not None:
                ax.axvline(int(first.meta[key]), color="black", linestyle=style, linewidth=0.8, alpha=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{label} ({first.metric[label]})")
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Mapping[str, ProbeResult], out_dir: str | Path, stem: str = "probe",
                 title: str | None = None) -> dict[str, Path]:
    """Write ``<stem>.json`` (all results), ``<stem>.md`` (tables) and ``<stem>.png`` (curves) into out_dir."""
    if not results:
        raise ValueError("write_report needs at least one named ProbeResult")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps({n: r.to_dict() for n, r in results.items()}, indent=1))
    heading = f"# {title}\n\n" if title else ""
    paths["md"].write_text(heading + markdown_table(results))
    plot_probes(results, paths["png"], title)
    return paths

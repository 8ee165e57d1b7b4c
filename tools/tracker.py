"""Numbers, images and tables of an RPO run (arXiv 2605.08354, §3.3) in wandb or TensorBoard: one conversion layer.

train.py logs three kinds of things and this module turns each into what the backend shows (the idea of Flow-Factory's
LogImage / LogTable converted per backend):
    numbers     every int / float of a metrics record         wandb: run.log     TensorBoard: add_scalar
    LogImage    the eval grid of every evaluation             wandb: wandb.Image TensorBoard: add_image (HWC)
    LogTable    a few rollouts of every window: prompt,       wandb: wandb.Table with image cells
                source, candidates, verdict, the judge's      TensorBoard: a markdown table (add_text) whose image
                reason, rewards, advantages                   cells are logged as images under TAG/ROW/COLUMN
With a relative reward (a win rate against the other candidate) the samples are how a user sees progress.

Both backends are optional and imported only here, only when `--log_with` names them:
    pip install wandb          (offline: WANDB_MODE=offline, files under OUTPUT_DIR/wandb)
    pip install tensorboard    (event files under OUTPUT_DIR/tensorboard; `tensorboard --logdir OUTPUT_DIR`)

Run: nothing to run; `python -m pytest tests/test_tracker.py` writes both backends offline and reads them back.

Deliberate deviations (ours)
    1. TensorBoard has no table: the table is markdown text and each image cell its own image tag, so the table
       names the tag where each picture is.
"""
from dataclasses import dataclass, field

from PIL import Image

BACKENDS = {"wandb": "wandb", "tensorboard": "tensorboard"}  # --log_with -> the pip package that provides it


@dataclass
class LogImage:
    """One picture (the eval grid) with a caption."""
    image: Image.Image
    caption: str = ""


@dataclass
class LogTable:
    """Rows of cells (str, number, None or a PIL image) under named columns."""
    columns: list
    rows: list = field(default_factory=list)


def require(backend):
    """Import the backend's package, or ImportError naming the pip command."""
    try:
        if backend == "wandb":
            import wandb
            return wandb
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError as e:
        raise ImportError(f"--log_with {backend} needs the {BACKENDS[backend]} package: pip install "
                          f"{BACKENDS[backend]} ({e})") from None


class Tracker:
    """One run's wandb run or TensorBoard writer. `log(values, step)`: a dict of numbers, LogImage and LogTable
    values (anything else is skipped: metrics.jsonl keeps it)."""

    def __init__(self, backend, out, config):
        if backend not in BACKENDS:
            raise ValueError(f"unknown tracker {backend!r}; choose one of {sorted(BACKENDS)}")
        self.backend = backend
        module = require(backend)
        if backend == "wandb":
            self.wandb = module
            self.run = module.init(project="arr-rpo", config=config, dir=str(out))
        else:
            self.writer = module(str(out / "tensorboard"))

    def log(self, values, step):
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        media = {k: v for k, v in values.items() if isinstance(v, (LogImage, LogTable))}
        if self.backend == "wandb":
            self.run.log({**numbers, **{k: self._wandb(v) for k, v in media.items()}}, step=step)
            return
        for k, v in numbers.items():
            self.writer.add_scalar(k, v, step)
        for k, v in media.items():
            if isinstance(v, LogImage):
                self.writer.add_image(k, _hwc(v.image), step, dataformats="HWC")
            else:
                self.writer.add_text(k, self._markdown(k, v, step), step)

    def log_image(self, name, image, step, caption=""):
        self.log({name: LogImage(image, caption)}, step)

    def log_table(self, name, columns, rows, step):
        self.log({name: LogTable(list(columns), [list(row) for row in rows])}, step)

    def _wandb(self, value):
        if isinstance(value, LogImage):
            return self.wandb.Image(value.image, caption=value.caption)
        cell = lambda c: self.wandb.Image(c) if isinstance(c, Image.Image) else c  # noqa: E731
        return self.wandb.Table(columns=list(value.columns), data=[[cell(c) for c in row] for row in value.rows])

    def _markdown(self, tag, table, step):
        """The table as markdown; each image cell is added as the image TAG/ROW/COLUMN and named in its cell."""
        lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        for r, row in enumerate(table.rows):
            cells = []
            for column, cell in zip(table.columns, row):
                if isinstance(cell, Image.Image):
                    name = f"{tag}/{r}/{column}"
                    self.writer.add_image(name, _hwc(cell), step, dataformats="HWC")
                    cell = f"(image {name})"
                cells.append(str(cell).replace("|", "/").replace("\n", " "))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def close(self):
        if self.backend == "wandb":
            self.run.finish()
        else:
            self.writer.close()


def _hwc(image):
    """A PIL image as a uint8 (H, W, 3) array for TensorBoard."""
    import numpy as np
    return np.asarray(image.convert("RGB"))

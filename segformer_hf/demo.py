"""`segformer-hf demo`: try a segmentation model in the browser, locally or as a Hugging Face Space.

The app shows live what `segformer-hf predict` writes: the same model loading, the same inference and the
same class colours, plus each class's share of the pixels. One `Segmenter` does the work and the Gradio
layer only wires it to components, so tests can check the work without a browser. Moving the opacity
slider re-blends the prediction the session keeps; it does not run the model again.

gradio is an optional dependency: importing this module does not import it, `build_demo` does, and says
how to install it when it is missing.

A Space that runs this same app is written by `write_space`. segformer_hf is not on PyPI, so a Space
could not pip install it: the Space repository carries the package's Python source beside its app.py,
and requirements.txt lists what that source imports.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .files import list_image_files
from .inference import InferenceProtocol, load_model_for_inference, segment
from .visualization import overlay, render_legend, resolve_palette

if TYPE_CHECKING:
    import gradio

GRADIO_MISSING = (
    "The demo needs gradio, an optional dependency of segformer_hf. Install it with `pip install gradio`, "
    'or from a checkout of segformer_hf with `pip install ".[demo]"`.'
)
DEFAULT_OPACITY = 0.5
# The val images of the bundled CamVid subset: the examples offered for a model of its classes.
DEMO_DATA = Path(__file__).resolve().parent / "recipes" / "camvid-demo"
MAX_EXAMPLES = 8
SHARE_HEADERS = ["class", "colour", "pixels (%)"]
# What the package's modules import at run time when the app runs (gradio is the Space's SDK), with the
# bounds of setup.cfg's install_requires (tests/test_demo.py holds the two together).
SPACE_REQUIREMENTS = (
    "torch>=2.4",
    "transformers>=5.0,<6",
    "huggingface-hub>=1.0",
    "safetensors>=0.4",
    "pillow>=10.0",
    "numpy>=1.26",
)


# The work: one model, its colours and names ------------------------------------------------------------


@dataclass
class Segmenter:
    """A model ready for the demo: it predicts label maps and draws them as `segformer-hf predict` does.

    Attributes:
        model: a semantic-segmentation model (ours or transformers' SegFormer), in eval mode.
        image_processor: the model's image processor (resize + normalisation), or None for ImageNet
            normalisation at the image's own size (see `inference.segment`).
        id2label: class names by id.
        palette: (num_labels, 3) uint8 class colours (`visualization.resolve_palette`).
        protocol: how images are predicted.
    """

    model: torch.nn.Module
    image_processor: Any
    id2label: dict[int, str]
    palette: np.ndarray
    protocol: InferenceProtocol = field(default_factory=InferenceProtocol)

    @classmethod
    def load(
        cls,
        model_name_or_path: str | os.PathLike,
        *,
        classes_file: str | os.PathLike | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> Segmenter:
        """The model in a directory or Hub repo, loaded and coloured exactly as `segformer-hf predict` does."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, image_processor = load_model_for_inference(
            model_name_or_path, trust_remote_code=trust_remote_code, device=device
        )
        return cls.for_model(model, image_processor, classes_file=classes_file)

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        image_processor: Any = None,
        *,
        classes_file: str | os.PathLike | None = None,
    ) -> Segmenter:
        """A model already in memory (its config gives names and colours)."""
        config = model.config
        id2label = {int(index): str(name) for index, name in config.id2label.items()}
        palette = resolve_palette(config.num_labels, config=config, classes_file=classes_file)
        return cls(model.eval(), image_processor, id2label, palette)

    def predict(self, image: Image.Image) -> np.ndarray:
        """The label map (H, W) of an RGB image, at the image's size."""
        (label_map,) = segment(self.model, image, self.image_processor, self.protocol)
        return label_map

    def overlay(self, image: Image.Image, label_map: np.ndarray, opacity: float) -> Image.Image:
        """The image with the class colours blended on top; `opacity` is the colours' weight (0..1)."""
        return overlay(image, label_map, self.palette, alpha=float(opacity))

    def pixel_shares(self, label_map: np.ndarray) -> list[tuple[int, float]]:
        """(class id, fraction of the pixels) for every class present, the largest first."""
        counts = np.bincount(np.asarray(label_map).ravel(), minlength=len(self.palette))
        present = np.flatnonzero(counts)
        shares = [(int(index), float(counts[index] / counts.sum())) for index in present]
        return sorted(shares, key=lambda item: (-item[1], item[0]))

    def legend(self, shares: Sequence[tuple[int, float]]) -> Image.Image:
        """The classes present, one row each: colour swatch, name and pixel share (`render_legend`)."""
        names = {row: f"{self.name(index)}  {share:.1%}" for row, (index, share) in enumerate(shares)}
        return render_legend(names, self.palette[[index for index, _ in shares]])

    def share_table(self, shares: Sequence[tuple[int, float]]) -> list[list[Any]]:
        """Rows of class name, colour as #rrggbb and percentage of the pixels (two decimals)."""
        return [
            [self.name(index), "#{:02x}{:02x}{:02x}".format(*self.palette[index]), round(100 * share, 2)]
            for index, share in shares
        ]

    def name(self, index: int) -> str:
        return self.id2label.get(index, str(index))


def has_demo_classes(id2label: dict[Any, str]) -> bool:
    """Whether a model predicts the classes of the bundled CamVid subset, so that its images make sense."""
    classes = DEMO_DATA / "classes.json"
    if not classes.is_file():
        return False
    demo_labels = json.loads(classes.read_text(encoding="utf-8"))["id2label"]
    return {int(index): name for index, name in demo_labels.items()} == {
        int(index): name for index, name in id2label.items()
    }


def demo_example_images() -> list[Path]:
    """The bundled CamVid val images offered as examples (at most `MAX_EXAMPLES`)."""
    return list_image_files([DEMO_DATA / "val" / "images"])[:MAX_EXAMPLES]


# The app -------------------------------------------------------------------------------------------------


def import_gradio() -> Any:
    """gradio, imported on first use; ImportError says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(GRADIO_MISSING) from error
    return gradio


def build_demo(
    model_or_path: str | os.PathLike | torch.nn.Module | Segmenter,
    *,
    examples: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    image_processor: Any = None,
    classes_file: str | os.PathLike | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    title: str | None = None,
) -> gradio.Blocks:
    """The Gradio app for a model: image in; overlay, legend and pixel shares out; an opacity slider.

    `model_or_path` is a model directory or Hub repo id (loaded as `segformer-hf predict` loads it), a
    model in memory (with `image_processor`, default: ImageNet normalisation at the image's size), or a
    `Segmenter`. `examples` is a directory of images or a list of image files; by default the bundled
    CamVid val images when the model predicts their classes, else none. Two API endpoints exist for
    clients: `/segment` (image, opacity) and `/blend` (image, opacity; re-blends the session's prediction).

    Raises:
        ImportError: gradio is not installed (the message says how to install it).
    """
    gr = import_gradio()
    if isinstance(model_or_path, Segmenter):
        segmenter = model_or_path
    elif isinstance(model_or_path, torch.nn.Module):
        segmenter = Segmenter.for_model(model_or_path, image_processor, classes_file=classes_file)
    else:
        segmenter = Segmenter.load(
            model_or_path, classes_file=classes_file, device=device, trust_remote_code=trust_remote_code
        )
    example_files = _example_files(examples, segmenter)
    title = title or f"SegFormer: {_model_name(model_or_path, segmenter)}"

    def segment_image(image, opacity):
        if image is None:
            return None, None, [], None
        image = image.convert("RGB")
        label_map = segmenter.predict(image)
        shares = segmenter.pixel_shares(label_map)
        return (
            segmenter.overlay(image, label_map, opacity),
            segmenter.legend(shares),
            segmenter.share_table(shares),
            label_map,
        )

    def blend(image, label_map, opacity):
        if image is None or label_map is None:
            return None
        return segmenter.overlay(image.convert("RGB"), label_map, opacity)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\n{len(segmenter.id2label)} classes. Upload an image or pick an example; the colours "
            "are those of `segformer-hf predict`."
        )
        label_map = gr.State(None)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="image")
                opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Overlay opacity")
                if example_files:
                    gr.Examples([[str(path)] for path in example_files], inputs=[image], label="Examples")
            with gr.Column():
                result = gr.Image(
                    type="pil", format="png", label="Segmentation", interactive=False, elem_id="overlay"
                )
                with gr.Row():
                    legend = gr.Image(type="pil", format="png", label="Legend", interactive=False)
                    shares = gr.Dataframe(
                        headers=SHARE_HEADERS, label="Pixel share", interactive=False, wrap=True
                    )
        image.change(segment_image, [image, opacity], [result, legend, shares, label_map], api_name="segment")
        opacity.change(blend, [image, label_map, opacity], [result], api_name="blend")
    return demo


def launch(
    demo: gradio.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
) -> None:
    """Serves the app; nothing is contacted beyond the local server unless `share` asks for a public link."""
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        quiet=prevent_thread_lock,
    )


def _example_files(
    examples: str | os.PathLike | Sequence[str | os.PathLike] | None, segmenter: Segmenter
) -> list[Path]:
    if examples is None:
        return demo_example_images() if has_demo_classes(segmenter.id2label) else []
    paths = [examples] if isinstance(examples, (str, os.PathLike)) else list(examples)
    return list_image_files(paths)[:MAX_EXAMPLES] if paths else []


def _model_name(model_or_path: Any, segmenter: Segmenter) -> str:
    """What the title calls the model: a Hub repo id as it is, a local directory by its name."""
    name = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else None
    name = name or getattr(segmenter.model.config, "_name_or_path", "") or type(segmenter.model).__name__
    path = Path(name)
    return path.resolve().name if path.exists() else str(name)


# A Hugging Face Space running the same app ---------------------------------------------------------------

_SPACE_APP = '''\
"""A Hugging Face Space running segformer_hf's demo app for the model {model_id}.

segformer_hf is not published on PyPI, so its Python source travels in this repository (segformer_hf/,
written by `segformer-hf push --space`); requirements.txt lists what it imports. SEGFORMER_HF_MODEL
overrides the model (a Hub repo id or a local directory).
"""

import os
from pathlib import Path

from segformer_hf.demo import build_demo

MODEL_ID = {model_id!r}
EXAMPLES = sorted((Path(__file__).parent / "examples").glob("*"))


def create_demo(model: str | None = None):
    return build_demo(model or os.environ.get("SEGFORMER_HF_MODEL", MODEL_ID), examples=EXAMPLES)


if __name__ == "__main__":
    create_demo().launch()
'''


def write_space(
    destination: str | os.PathLike,
    model_id: str,
    *,
    examples: Sequence[str | os.PathLike] = (),
    title: str | None = None,
) -> list[str]:
    """Fills `destination` with a Hub Space that serves this demo for the Hub model `model_id`.

    It holds app.py, requirements.txt, README.md (the Space's front matter: sdk gradio, app_file app.py),
    the package's Python source under segformer_hf/ and copies of the `examples` images under examples/.
    Returns the files written, relative to `destination`.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "app.py").write_text(_SPACE_APP.format(model_id=model_id), encoding="utf-8")
    (destination / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n", encoding="utf-8")
    (destination / "README.md").write_text(_space_card(model_id, title), encoding="utf-8")
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):
        target = destination / "segformer_hf" / source.relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for path in list_image_files(examples)[:MAX_EXAMPLES] if examples else []:
        (destination / "examples").mkdir(exist_ok=True)
        shutil.copyfile(path, destination / "examples" / path.name)
    return sorted(str(path.relative_to(destination)) for path in destination.rglob("*") if path.is_file())


def _space_card(model_id: str, title: str | None) -> str:
    from huggingface_hub import SpaceCard, SpaceCardData

    metadata = SpaceCardData(
        title=title or f"{model_id.split('/')[-1]} demo",
        sdk="gradio",
        sdk_version=_gradio_version(),
        app_file="app.py",
        license="apache-2.0",
        models=[model_id],
        tags=["image-segmentation", "segformer", "segformer_hf"],
    )
    text = f"""
        # {model_id.split("/")[-1]}

        Semantic segmentation with [{model_id}](https://huggingface.co/{model_id}): upload an image to see
        each pixel's predicted class as a coloured overlay, a legend and every class's share of the pixels.

        This Space runs segformer_hf's own demo app (`segformer-hf demo`): `app.py` builds it, and the
        package's source is in `segformer_hf/` because the package is not published on PyPI.
        """
    return str(SpaceCard(f"---\n{metadata.to_yaml()}\n---\n{textwrap.dedent(text)}"))


def _gradio_version() -> str:
    """The gradio the Space should run: the one this app was built and tested with."""
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(GRADIO_MISSING) from None


# The command line ----------------------------------------------------------------------------------------


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segformer-hf demo",
        description="Serve a Gradio app to try a model in the browser: upload an image, see its segmentation.",
    )
    parser.add_argument("--model", required=True, help="model directory or Hub repo id")
    parser.add_argument(
        "--examples",
        default=None,
        help="directory of example images (default: the bundled CamVid images for a model of their classes)",
    )
    parser.add_argument(
        "--classes_file", default=None, help="JSON with a palette (as for `segformer-hf predict`)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 to serve the network"
    )
    parser.add_argument("--port", type=int, default=None, help="default: 7860, or the next free port")
    parser.add_argument(
        "--share", type=_boolean, default=False, help="true: also open a temporary public gradio.live link"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`segformer-hf demo --model DIR_OR_REPO`: serve until interrupted; 2 for bad arguments or no gradio."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        import_gradio()
        demo = build_demo(
            args.model,
            examples=args.examples,
            classes_file=args.classes_file,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
        )
    except (ImportError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo app (`segformer-hf demo`) driven the way people use it: through the HTTP API its page calls
(gradio_client), once through a real headless browser, and as the Hub Space that `push --space` writes.

The app runs on 127.0.0.1 with analytics off and no share link: nothing leaves this machine. Its
pictures are checked against `segformer-hf predict`'s files and against the VOC colour map written out
here, never against the app's own helpers.
"""

import ast
import configparser
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from conftest import DEMO_DATA, REPO_ROOT  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from PIL import Image  # noqa: E402
from test_hub import HubRecorder  # noqa: E402
from transformers import SegformerImageProcessor  # noqa: E402

from segformer_hf import SegformerHFConfig, SegformerHFForSemanticSegmentation, cli, demo, prediction  # noqa: E402  # noqa: E402
from segformer_hf.demo import SHARE_HEADERS, SPACE_REQUIREMENTS, Segmenter, build_demo, launch  # noqa: E402
from segformer_hf.hub import main as hub_main
from segformer_hf.hub import push_space  # noqa: E402

ID2LABEL = {0: "road", 1: "sky", 2: "tree"}
# The PASCAL VOC colour map's first entries: what a model without a palette of its own is drawn with.
VOC_COLOURS = {"road": (0, 0, 0), "sky": (128, 0, 0), "tree": (0, 128, 0)}
MODEL_ID = "someone/segformer-b0-demo"
SPACE_ID = "someone/segformer-b0-demo-space"


@dataclass
class App:
    demo: gr.Blocks
    url: str
    client: Client
    forward_calls: list


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random B0 of three classes, saved with a 64x64 image processor, as training leaves it."""
    config = SegformerHFConfig.from_variant(
        "b0", num_labels=3, id2label=ID2LABEL, label2id={name: index for index, name in ID2LABEL.items()}
    )
    torch.manual_seed(0)
    model = SegformerHFForSemanticSegmentation(config)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    """A small non-square street scene from the bundled data, as a lossless PNG (uploads are exact)."""
    path = tmp_path_factory.mktemp("images") / "street.png"
    with Image.open(DEMO_DATA / "val" / "images" / "0016E5_07965.jpg") as image:
        image.convert("RGB").resize((96, 72)).save(path)
    return path


@pytest.fixture(scope="module")
def app(model_dir) -> App:
    segmenter = Segmenter.load(model_dir, device="cpu")
    forward_calls = []
    segmenter.model.register_forward_hook(lambda *args: forward_calls.append(1))
    blocks = build_demo(segmenter, examples=[DEMO_DATA / "val" / "images"])
    port = _free_port()
    launch(blocks, port=port, prevent_thread_lock=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        yield App(blocks, url, Client(url, verbose=False), forward_calls)
    finally:
        blocks.close()


def _segment(app: App, image_file: Path, opacity: float):
    overlay, legend, table = app.client.predict(handle_file(str(image_file)), opacity, api_name="/segment")
    return Path(overlay), Path(legend), table


# The app through its API ---------------------------------------------------------------------------------


def test_uploaded_image_comes_back_as_the_overlay_predict_writes(app, image_file, model_dir, tmp_path):
    overlay, _, _ = _segment(app, image_file, 0.5)

    shown, original = _rgb(overlay), _rgb(image_file)
    assert shown.shape == original.shape
    assert not np.array_equal(shown, original)
    # `segformer-hf predict` on the same file, with its default opacity.
    assert (
        prediction.main(
            [str(image_file), "--model", str(model_dir), "--output", str(tmp_path), "--device", "cpu"]
        )
        == 0
    )
    np.testing.assert_array_equal(shown, _rgb(tmp_path / "street_overlay.png"))


def test_legend_and_pixel_shares_describe_the_predicted_classes(app, image_file):
    overlay, legend, table = _segment(app, image_file, 1.0)

    # At full opacity every pixel shows its class colour: count them.
    colours, counts = np.unique(_rgb(overlay).reshape(-1, 3), axis=0, return_counts=True)
    pixel_share = {
        tuple(int(v) for v in colour): 100 * count / counts.sum() for colour, count in zip(colours, counts)
    }
    name_of = {colour: name for name, colour in VOC_COLOURS.items()}
    assert set(pixel_share) <= set(name_of), "the overlay shows a colour that is no class's"
    assert len(pixel_share) >= 2, "the test image should show several classes for the checks to mean much"

    assert table["headers"] == SHARE_HEADERS
    rows = table["data"]
    assert [row[0] for row in rows] == sorted(
        (name_of[colour] for colour in pixel_share), key=lambda name: -pixel_share[VOC_COLOURS[name]]
    )
    for name, colour, percent in rows:
        assert colour == "#{:02x}{:02x}{:02x}".format(*VOC_COLOURS[name])
        assert percent == pytest.approx(pixel_share[VOC_COLOURS[name]], abs=0.005)

    # The legend: one swatch per row of the table, in the same order and colours (16 px swatches, 24 px rows).
    drawn = _rgb(legend)
    assert drawn.shape[0] == 8 + 24 * len(rows)
    for row, (name, _, _) in enumerate(rows):
        assert tuple(drawn[8 + 24 * row + 8, 15]) == VOC_COLOURS[name], name


def test_opacity_slider_reblends_the_kept_prediction_without_running_the_model_again(app, image_file):
    half, _, _ = _segment(app, image_file, 0.5)
    full, _, _ = _segment(app, image_file, 1.0)
    calls = len(app.forward_calls)

    def blend(opacity):
        return _rgb(app.client.predict(handle_file(str(image_file)), opacity, api_name="/blend"))

    np.testing.assert_array_equal(blend(0.0), _rgb(image_file))
    np.testing.assert_array_equal(blend(0.5), _rgb(half))
    np.testing.assert_array_equal(blend(1.0), _rgb(full))
    assert not np.array_equal(blend(0.25), _rgb(half))
    assert len(app.forward_calls) == calls, "moving the slider ran the model again"


def test_examples_are_the_bundled_images_for_a_model_of_their_classes(tmp_path):
    classes = json.loads((DEMO_DATA / "classes.json").read_text())
    camvid = SegformerHFConfig.from_variant(
        "b0", num_labels=classes["num_labels"], id2label=classes["id2label"]
    )
    three = SegformerHFConfig.from_variant("b0", num_labels=3, id2label=ID2LABEL)
    (tmp_path / "mine.png").write_bytes((DEMO_DATA / "val" / "images" / "0016E5_08003.jpg").read_bytes())

    def examples(config, **kwargs):
        blocks = build_demo(SegformerHFForSemanticSegmentation(config), **kwargs)
        datasets = [block for block in blocks.blocks.values() if isinstance(block, gr.Dataset)]
        return [Path(sample[0]).name for dataset in datasets for sample in dataset.raw_samples]

    bundled = sorted(path.name for path in (DEMO_DATA / "val" / "images").iterdir())
    assert examples(camvid) == bundled[: demo.MAX_EXAMPLES]
    assert examples(three) == []
    assert examples(three, examples=tmp_path) == ["mine.png"]


def test_demo_command_serves_on_localhost_without_a_share_link(model_dir, monkeypatch):
    served = []
    monkeypatch.setattr(demo, "launch", lambda blocks, **kwargs: served.append((blocks, kwargs)))

    assert cli.main(["demo", "--model", str(model_dir), "--port", "7999", "--share", "false"]) == 0
    ((blocks, settings),) = served
    assert isinstance(blocks, gr.Blocks)
    assert settings == {"host": "127.0.0.1", "port": 7999, "share": False}
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(["--model", str(model_dir), "--share", "perhaps"])


def test_missing_gradio_is_reported_with_install_commands_that_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed

    assert cli.main(["demo", "--model", str(tmp_path / "no-model-here")]) == 2
    message = capsys.readouterr().err
    assert "pip install gradio" in message and 'pip install ".[demo]"' in message
    # The extra that the message names exists, and holds gradio.
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    demo_extra = setup["options.extras_require"]["demo"].split()
    assert any(Requirement(line).name == "gradio" for line in demo_extra)


# The browser ---------------------------------------------------------------------------------------------


def _browser_binaries() -> tuple[str, str]:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "no chromium and chromedriver binaries found (Debian: apt-get install chromium chromium-driver); "
            "the same app is driven through its API by the other tests"
        )
    return chromium, driver


def test_a_browser_uploads_an_image_and_sees_its_overlay(app, image_file, tmp_path):
    chromium, driver = _browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        browser.set_page_load_timeout(30)
        browser.get(app.url)
        upload = WebDriverWait(browser, 30).until(
            lambda page: page.find_elements(By.CSS_SELECTOR, "#image input[type=file]")
        )
        upload[0].send_keys(str(image_file))
        size = WebDriverWait(browser, 30).until(
            lambda page: page.execute_script(
                "const shown = document.querySelector('#overlay img');"
                "return shown && shown.complete && shown.naturalWidth ? [shown.naturalWidth, shown.naturalHeight] : null;"
            )
        )
        assert tuple(size) == Image.open(image_file).size
        screenshot = tmp_path / "demo.png"
        assert browser.save_screenshot(str(screenshot))
    finally:
        browser.quit()
    assert Image.open(screenshot).size[0] > 0
    if os.environ.get("SEGFORMER_HF_DEMO_SCREENSHOT"):  # to look at the page by hand
        shutil.copyfile(screenshot, os.environ["SEGFORMER_HF_DEMO_SCREENSHOT"])


# The Hub Space -------------------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubRecorder:
    monkeypatch.setenv("HF_TOKEN", "hf_token_for_tests")
    recorder = HubRecorder(tmp_path / "hub")
    recorder.install(monkeypatch)
    return recorder


@pytest.fixture
def space(hub) -> Path:
    """The Space pushed for MODEL_ID with two example images: the folder of its one commit."""
    images = sorted((DEMO_DATA / "val" / "images").iterdir())[:2]
    url = push_space(SPACE_ID, MODEL_ID, examples=images)
    assert url == f"https://huggingface.co/{SPACE_ID}"
    assert [(c["repo_id"], c["repo_type"], c.get("space_sdk")) for c in hub.created] == [
        (SPACE_ID, "space", "gradio")
    ]
    commit = hub.only_commit
    assert commit["repo_id"] == SPACE_ID and commit["repo_type"] == "space"
    return commit["folder"]


def test_space_push_sends_app_card_requirements_package_and_examples_in_one_commit(space):
    assert {"app.py", "requirements.txt", "README.md"} <= {path.name for path in space.iterdir()}
    assert sorted(path.name for path in (space / "examples").iterdir()) == [
        "0016E5_07965.jpg",
        "0016E5_07977.jpg",
    ]
    package = REPO_ROOT / "segformer_hf"
    for source in package.rglob("*.py"):
        if "__pycache__" not in source.parts:
            assert (space / "segformer_hf" / source.relative_to(package)).read_bytes() == source.read_bytes()
    assert not (space / "segformer_hf" / "recipes" / "camvid-demo").exists(), (
        "the data set has no place in a Space"
    )

    readme = (space / "README.md").read_text()
    metadata = yaml.safe_load(readme.split("---\n", 2)[1])
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py"
    assert metadata["sdk_version"] == gr.__version__
    assert metadata["models"] == [MODEL_ID]
    assert f"MODEL_ID = {MODEL_ID!r}" in (space / "app.py").read_text()


def test_push_command_with_only_space_pushes_a_space_for_the_hub_model(hub, tmp_path, capsys):
    examples = tmp_path / "examples"
    examples.mkdir()
    shutil.copyfile(DEMO_DATA / "val" / "images" / "0016E5_08003.jpg", examples / "crossing.jpg")

    assert hub_main(["--repo_id", MODEL_ID, "--space", SPACE_ID, "--examples", str(examples)]) == 0
    assert capsys.readouterr().out.split() == [f"https://huggingface.co/{SPACE_ID}"]
    folder = hub.only_commit["folder"]
    assert [path.name for path in (folder / "examples").iterdir()] == ["crossing.jpg"]
    assert f"MODEL_ID = {MODEL_ID!r}" in (folder / "app.py").read_text()
    with pytest.raises(SystemExit):  # neither an output directory nor a Space: nothing to push
        hub_main(["--repo_id", MODEL_ID])


def test_space_requirements_keep_the_bounds_of_setup_cfg():
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    install_requires = {
        Requirement(line).name: str(Requirement(line))
        for line in setup["options"]["install_requires"].split()
    }
    for line in SPACE_REQUIREMENTS:
        requirement = Requirement(line)
        assert str(requirement) == install_requires[requirement.name], line


SPACE_RUN = """
import json, sys
import segformer_hf
from app import create_demo
from gradio_client import Client, handle_file
from segformer_hf.demo import launch

model_dir, image, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
blocks = create_demo(model_dir)
launch(blocks, port=port, prevent_thread_lock=True)
overlay, legend, table = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
    handle_file(image), 0.5, api_name="/segment"
)
blocks.close()
loaded = sorted(name for name in sys.modules if name == "segformer_hf" or name.startswith("segformer_hf."))
print(json.dumps({"package": segformer_hf.__file__, "overlay": overlay, "loaded": loaded}))
"""


def test_space_app_serves_the_demo_from_its_own_copy_of_the_package(space, model_dir, image_file, tmp_path):
    """app.py run in the Space's folder, with a local model in place of the Hub one and this checkout off the path."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(
        [sys.executable, "-c", SPACE_RUN, str(model_dir), str(image_file), str(_free_port())],
        cwd=space,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(space)
    # The same picture `segformer-hf predict` draws.
    assert (
        prediction.main(
            [str(image_file), "--model", str(model_dir), "--output", str(tmp_path), "--device", "cpu"]
        )
        == 0
    )
    np.testing.assert_array_equal(_rgb(result["overlay"]), _rgb(tmp_path / "street_overlay.png"))
    # Every dependency of segformer_hf that the package's modules the app loaded import (at the top or
    # inside a function) is in the Space's requirements.
    imported = set()
    for module in result["loaded"]:
        path = space / Path(*module.split("."))
        imported |= _third_party_imports(path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))
    assert "segformer_hf.demo" in result["loaded"] and "torch" in imported
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    dependencies = {_normalised(line) for line in setup["options"]["install_requires"].split()}
    required = {_normalised(line) for line in SPACE_REQUIREMENTS}
    distributions = importlib.metadata.packages_distributions()
    used = {_normalised(dist) for module in imported for dist in distributions.get(module, [])}
    assert (used & dependencies) <= required, sorted((used & dependencies) - required)


def _third_party_imports(path: Path) -> set[str]:
    """The top-level names of the absolute imports in a Python file, wherever they stand in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - {"segformer_hf"}


def _normalised(requirement: str) -> str:
    """A distribution's name as PEP 503 compares them (PyYAML = pyyaml, huggingface_hub = huggingface-hub)."""
    return Requirement(requirement).name.lower().replace("_", "-")

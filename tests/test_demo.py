"""The Gradio demo (demo/app.py): its pure `run` function, its HTTP API, and the page in a real headless browser.

Needs the `demo` extra (`pip install -e ".[dev]"` brings it) and, for the browser tests, Debian's `apt-get install
chromium chromium-driver` (CHROMIUM_BINARY and CHROMEDRIVER point elsewhere). Without them the tests are skipped with
that reason (failed under HF_HYPERVQ_STRICT_SKIPS=1, as in CI). The browser tests are slow (RUN_SLOW=1).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from optional_parts import require_executables, require_modules


require_modules("gradio", "gradio_client", "selenium", install='pip install -e ".[dev]" (the `demo` extra)')

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from hf_hypervq import (  # noqa: E402
    HyperVQImageProcessor,
    HyperVQPriorConfig,
    HyperVQPriorModel,
    HyperVQVAEConfig,
    HyperVQVAEForImageClassification,
    HyperVQVAEModel,
)


DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
LABELS = ["zero", "one", "two"]
IMAGE_SIZE = 16  # the tiny tokenizer's input: 16×16 pixels -> 4×4 tokens
CHROMIUM_BINARY = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def _import_app():
    # demo/ is a Space folder, not a package: import app.py by path, once
    if "hypervq_demo_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("hypervq_demo_app", DEMO_DIR / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["hypervq_demo_app"]


app = _import_app()
# gradio 6.31's queue calls pandas APIs that pandas 3 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny random tokenizer and a frozen-feature classifier on it, each saved with its image processor."""
    root = tmp_path_factory.mktemp("demo_models")
    tokenizer_dir, classifier_dir = root / "tokenizer", root / "classifier"
    processor = HyperVQImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    torch.manual_seed(0)
    config = HyperVQVAEConfig(
        hidden_size=16, residual_hidden_size=8, embedding_dim=8, codebook_size=16, num_residual_layers=1
    )
    HyperVQVAEModel(config).save_pretrained(tokenizer_dir)
    processor.save_pretrained(tokenizer_dir)
    classifier = HyperVQVAEForImageClassification.from_pretrained(
        tokenizer_dir,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    classifier.save_pretrained(classifier_dir)
    processor.save_pretrained(classifier_dir)
    return tokenizer_dir, classifier_dir


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    return app.load_tokenizer(str(model_dirs[0]))


@pytest.fixture(scope="module")
def classifier(model_dirs):
    return app.load_classifier(str(model_dirs[1]))


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A tiny class-conditional token prior over the tokenizer's 16 codes, saved and loaded as the app does."""
    folder = tmp_path_factory.mktemp("demo_prior")
    config = HyperVQPriorConfig(
        codebook_size=16, hidden_size=8, num_layers=2, head_hidden_size=16, grid_size=[4, 4], num_classes=3,
        id2label=dict(enumerate(LABELS)),
    )  # fmt: skip
    HyperVQPriorModel(config).save_pretrained(folder)
    return app.load_prior(str(folder))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """A 40×30 PNG of random colours and a text file named .png."""
    root = tmp_path_factory.mktemp("demo_images")
    pixels = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    image_path, broken_path = root / "colours.png", root / "broken.png"
    Image.fromarray(pixels).save(image_path)
    broken_path.write_text("this is not an image\n")
    return image_path, broken_path


def _reference(tokenizer, image_path):
    """Tokens and reconstruction computed with the model's own API, as the README shows it."""
    image = Image.open(image_path).convert("RGB")
    pixel_values = tokenizer.processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = tokenizer.model.get_image_tokens(pixel_values)
        reconstruction = tokenizer.processor.postprocess_reconstruction(tokenizer.model.decode_tokens(tokens))[0]
    return tokens[0], reconstruction


# ---- run(): the pure function ----


def test_run_matches_the_model_api(tokenizer, classifier, image_files):
    image_path = image_files[0]
    output = app.run(str(image_path), tokenizer, classifier)
    tokens, reconstruction = _reference(tokenizer, image_path)

    assert isinstance(output, app.DemoOutput)
    assert output.image_tokens == tokens.tolist()
    assert len(output.image_tokens) == 4 and all(len(row) == 4 for row in output.image_tokens)
    assert isinstance(output.reconstruction, Image.Image) and output.reconstruction.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.array_equal(np.asarray(output.reconstruction), np.asarray(reconstruction))

    # the token map: each 4×4 block has the palette colour of its code id
    assert output.token_map.size == (IMAGE_SIZE, IMAGE_SIZE) and output.token_map.mode == "RGB"
    expected_map = app.code_palette(16)[tokens.numpy()].repeat(4, axis=0).repeat(4, axis=1)
    assert np.array_equal(np.asarray(output.token_map), expected_map)

    assert output.codebook_usage.equals(app.codebook_usage(tokens, 16))
    assert f"{len(output.codebook_usage)} of 16 codes used" in output.summary

    inputs = classifier.processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        probabilities = classifier.model(**inputs).logits.softmax(-1)[0]
    assert list(output.prediction) == LABELS
    assert list(output.prediction.values()) == pytest.approx(probabilities.tolist())


def test_run_takes_pil_images_and_arrays_and_no_classifier(tokenizer, image_files):
    image = Image.open(image_files[0]).convert("RGBA")  # any mode: converted for the tokenizer
    from_path = app.run(str(image_files[0]), tokenizer)
    for image_input in (image, np.asarray(image.convert("RGB"))):
        output = app.run(image_input, tokenizer)
        assert output.image_tokens == from_path.image_tokens
        assert output.prediction is None


def test_classifier_folder_loads_as_tokenizer(model_dirs, tokenizer, image_files):
    as_tokenizer = app.load_tokenizer(str(model_dirs[1]))
    assert isinstance(as_tokenizer.model, HyperVQVAEModel)
    output = app.run(str(image_files[0]), as_tokenizer)
    assert output.image_tokens == app.run(str(image_files[0]), tokenizer).image_tokens


@pytest.mark.slow
def test_loads_with_remote_code_without_the_package(model_dirs, tokenizer, classifier, image_files, tmp_path):
    # a Space without hf-hypervq installed: the code saved next to the weights (trust_remote_code=True) is used
    script = f"""
import json, sys
sys.modules["hf_hypervq"] = None  # `import hf_hypervq` raises ImportError
sys.path.insert(0, {str(DEMO_DIR)!r})
import app
assert app.TRUST_REMOTE_CODE
tokenizer, classifier = app.load_tokenizer({str(model_dirs[0])!r}), app.load_classifier({str(model_dirs[1])!r})
assert type(tokenizer.model).__module__.startswith("transformers_modules.")
output = app.run({str(image_files[0])!r}, tokenizer, classifier)
print(json.dumps({{"image_tokens": output.image_tokens, "prediction": output.prediction}}))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # keep ~/.cache clean
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    expected = app.run(str(image_files[0]), tokenizer, classifier)
    assert remote["image_tokens"] == expected.image_tokens
    assert remote["prediction"] == pytest.approx(expected.prediction, abs=1e-6)


def test_run_rejects_what_is_not_an_image(tokenizer, image_files):
    with pytest.raises(gr.Error, match="Could not read 'broken.png' as an image"):
        app.run(str(image_files[1]), tokenizer)
    with pytest.raises(gr.Error, match="Upload an image"):
        app.run(None, tokenizer)
    with pytest.raises(gr.Error, match="Upload an image"):
        app.run({"path": None}, tokenizer)  # an empty `gr.Image` payload


def test_codebook_usage_and_token_map_of_a_token_grid():
    # a random tokenizer puts nearly every patch on one code: check the counting and the colouring on a known grid
    tokens = torch.tensor([[5, 5, 0], [7, 5, 0]])
    usage = app.codebook_usage(tokens, codebook_size=8)
    assert usage["code"].tolist() == ["5", "0", "7"] and usage["count"].tolist() == [3, 2, 1]

    token_map = np.asarray(app.token_map_image(tokens, codebook_size=8, size=(6, 4)))  # 2×2 pixels per token
    assert token_map.shape == (4, 6, 3)
    palette = app.code_palette(8)
    for (row, column), code in np.ndenumerate(tokens.numpy()):
        assert (token_map[2 * row : 2 * row + 2, 2 * column : 2 * column + 2] == palette[code]).all()


def test_code_palette_is_fixed_and_distinct():
    palette = app.code_palette(512)
    assert palette.shape == (512, 3) and palette.dtype == np.uint8
    assert np.array_equal(palette[:16], app.code_palette(16))  # a code keeps its colour whatever the codebook size
    assert len({tuple(color) for color in palette}) == 512


def test_example_images_ship_with_the_demo():
    examples = sorted(app.EXAMPLES_DIR.glob("*.png"))
    assert 3 <= len(examples) <= 4
    for path in examples:
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_codebook_pictures_are_the_decoded_codes(tokenizer):
    images = app.codebook_images(tokenizer)
    assert len(images) == 16 and images[0].size == (4, 4)  # one token = 4×4 pixels
    with torch.no_grad():
        code_5 = tokenizer.model.decode_tokens(torch.tensor([[[5]]]))
    assert np.array_equal(np.asarray(images[5]), np.asarray(tokenizer.processor.postprocess_reconstruction(code_5)[0]))


def test_sample_draws_decoded_images_reproducibly(prior, tokenizer):
    first = app.sample(prior, tokenizer, 3, 1.0, 7, "two")
    again = app.sample(prior, tokenizer, 3, 1.0, 7, "two")
    assert len(first) == 3 and first[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    other = HyperVQPriorModel(HyperVQPriorConfig(codebook_size=32, hidden_size=8, num_layers=1, head_hidden_size=8))
    with pytest.raises(gr.Error, match="another tokenizer"):
        app.sample(other, tokenizer, 1, 1.0, 0)


def test_main_explains_a_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        app.main(["--model", str(tmp_path / "missing")])
    assert "could not load the model" in capsys.readouterr().err


def test_the_space_runs_as_copied(monkeypatch):
    """A Space made from demo/ as it is loads the published tokenizer its card lists; one whose HYPERVQ_MODEL is
    empty, or whose model cannot be loaded, says so in one line on the page instead of failing to start."""
    front_matter = (DEMO_DIR / "README.md").read_text().split("---")[1]
    assert f"models:\n- {app.DEFAULT_MODEL}\n" in front_matter and "/" in app.DEFAULT_MODEL
    assert app.build_parser().parse_args([]).model in (app.DEFAULT_MODEL, os.environ.get("HYPERVQ_MODEL"))
    pages = []
    monkeypatch.setattr(app, "message_page", lambda line: pages.append(line) or gr.Blocks())
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: None)
    monkeypatch.setenv("SPACE_ID", "your-name/hypervq-demo")
    app.main(["--model", ""])
    app.main(["--model", "org/not-there"])  # offline in the tests: cannot be loaded
    assert pages[0].startswith("No model is set: set the Space variable `HYPERVQ_MODEL`")
    assert pages[1].startswith("Could not load the model `org/not-there`: ") and len(pages) == 2


# ---- the launched app: HTTP API and browser ----


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tokenizer, classifier, prior):
    demo = app.build_demo(tokenizer, classifier, prior)
    demo.launch(
        server_name="127.0.0.1",
        server_port=_free_port(),
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        css=app.CSS,
    )
    try:
        yield demo.local_url
    finally:
        demo.close()


def test_api_predict(server_url, tokenizer, image_files):
    client = Client(server_url, verbose=False, download_files=False)
    reconstruction, token_map, usage, image_tokens, summary, label = client.predict(
        handle_file(str(image_files[0])), api_name="/predict"
    )
    expected = app.run(str(image_files[0]), tokenizer)

    with Image.open(reconstruction["path"]) as image:  # served files stay on this machine: read them in place
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    with Image.open(token_map["path"]) as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert [[int(value) for value in row] for row in image_tokens["data"]] == expected.image_tokens
    assert usage["columns"] == ["code", "count"]  # the bar plot's data, one row per used code
    assert sum(count for _, count in usage["data"]) == len(expected.image_tokens) ** 2
    assert summary == expected.summary
    assert label["label"] in LABELS and {c["label"] for c in label["confidences"]} == set(LABELS)


def test_api_sample(server_url):
    client = Client(server_url, verbose=False, download_files=False)
    gallery = client.predict(4, 1.0, 3, "one", api_name="/sample")
    assert len(gallery) == 4
    with Image.open(gallery[0]["image"]["path"]) as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_api_reports_a_broken_image(server_url, image_files):
    client = Client(server_url, verbose=False, download_files=False)
    with pytest.raises(AppError, match="Could not read 'broken.png' as an image"):
        client.predict(handle_file(str(image_files[1])), api_name="/predict")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require_executables(CHROMIUM_BINARY, CHROMEDRIVER, install="`apt-get install chromium chromium-driver` (Debian)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM_BINARY
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}",
    ):
        options.add_argument(argument)
    # explicit driver and browser paths: Selenium Manager then never tries to download either
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _open_page(browser, server_url) -> WebDriverWait:
    browser.get(server_url)
    return WebDriverWait(browser, 20)


def _tokenize(browser, wait) -> None:
    # the input holds the image (or a broken one) once its upload reached the server: then click the button
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#input-image img")))
    browser.find_element(By.ID, "run-button").click()


def _wait_for_outputs(browser, wait, expected) -> None:
    # the outputs' PNGs have been fetched and decoded: <img>s of the tokenizer's resolution
    natural_width = "const image = document.querySelector(`#${arguments[0]} img`); return image && image.naturalWidth;"
    assert wait.until(lambda driver: driver.execute_script(natural_width, "reconstruction")) == IMAGE_SIZE
    assert wait.until(lambda driver: driver.execute_script(natural_width, "token-map")) == IMAGE_SIZE
    page = browser.find_element(By.TAG_NAME, "body")
    wait.until(lambda driver: expected.summary.replace("**", "") in page.text)
    assert max(expected.prediction, key=expected.prediction.get) in page.text


@pytest.mark.slow
def test_browser_tokenizes_an_uploaded_image(browser, server_url, tokenizer, classifier, image_files):
    wait = _open_page(browser, server_url)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]"))).send_keys(
        str(image_files[0])
    )
    _tokenize(browser, wait)
    _wait_for_outputs(browser, wait, app.run(str(image_files[0]), tokenizer, classifier))


@pytest.mark.slow
def test_browser_tokenizes_an_example(browser, server_url, tokenizer, classifier):
    wait = _open_page(browser, server_url)
    examples = wait.until(EC.presence_of_all_elements_located((By.CSS_SELECTOR, "#examples .gallery-item")))
    assert len(examples) == len(list(app.EXAMPLES_DIR.glob("*.png")))
    examples[-1].click()
    _tokenize(browser, wait)
    example = sorted(app.EXAMPLES_DIR.glob("*.png"))[-1]
    _wait_for_outputs(browser, wait, app.run(str(example), tokenizer, classifier))


@pytest.mark.slow
def test_browser_shows_an_error_for_a_broken_file(browser, server_url, image_files):
    wait = _open_page(browser, server_url)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]"))).send_keys(
        str(image_files[1])
    )
    _tokenize(browser, wait)
    page = browser.find_element(By.TAG_NAME, "body")
    wait.until(lambda driver: "Could not read 'broken.png' as an image" in page.text)

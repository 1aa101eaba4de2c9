"""Fetch transformers' common model tests for `tests/test_transformers_conformance.py`.

transformers tests every model it ships with two mixins from its own `tests/` folder: `ModelTesterMixin`
(tests/test_modeling_common.py) and `ConfigTester` (tests/test_configuration_common.py). They are not part of the
wheel, so this script takes them from the sdist of the *installed* transformers version and writes them, as the
importable package `transformers_tests`, into `transformers_tests/` at the repository root (ignored by git):

    python tools/fetch_transformers_tests.py                    # pip download of the sdist (needs PyPI)
    python tools/fetch_transformers_tests.py --sdist transformers-5.25.0.tar.gz   # an sdist already here

The sdist ships the top level of `tests/` only, not three modules those two files import. They are replaced by
stand-ins written below, each saying what it replaces:
- `generation/test_utils.py`: `GenerationTesterMixin`, which test_modeling_common.py only uses in `issubclass`
  checks (a tester of a model that cannot generate must not inherit it); an empty class is exact for those.
- `exporters/test_export.py`: `ExportTesterMixin`, the base of `ModelTesterMixin` that adds the export tests
  (ONNX, ExecuTorch, OpenVINO, TensorRT, AOTInductor); an empty class, so those tests do not run.
- `utils/test_configuration_utils.py`: `config_common_kwargs`, the non-default values of `PreTrainedConfig`'s
  common fields that `ConfigTester.check_config_arguments_init` sets, copied from transformers 5.
"""

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers


ROOT = Path(__file__).resolve().parent.parent
DESTINATION = ROOT / "transformers_tests"
# The files of the sdist's tests/ folder that the conformance tests import.
FILES = ("test_modeling_common.py", "test_configuration_common.py")
VERSION_FILE = "TRANSFORMERS_VERSION"

HEADER = '"""Stand-in written by tools/fetch_transformers_tests.py: {what}"""\n\n'
STAND_INS = {
    "generation/test_utils.py": HEADER.format(
        what="the sdist lacks tests/generation/. test_modeling_common.py uses the mixin only in `issubclass` checks."
    )
    + "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": HEADER.format(
        what="the sdist lacks tests/exporters/. The export tests (ONNX, ExecuTorch, ...) do not run."
    )
    + "class ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": HEADER.format(
        what="the sdist lacks tests/utils/. `config_common_kwargs` as in transformers 5's file of that name."
    )
    + """config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
""",
}


def download_sdist(version: str, directory: Path) -> Path:
    """`pip download` of transformers' sdist at `version` into `directory`."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*command, f"transformers=={version}", "-d", str(directory)], check=True)
    (sdist,) = directory.glob(f"transformers-{version}.tar.gz")
    return sdist


def extract(sdist: Path, version: str, destination: Path) -> None:
    """Write the files of `FILES` from `sdist`, the stand-ins and the version into `destination`."""
    with tarfile.open(sdist) as archive:
        members = {f"transformers-{version}/tests/{name}": name for name in FILES}
        found = {member.name: member for member in archive.getmembers() if member.name in members}
        missing = sorted(set(members) - set(found))
        if missing:
            sys.exit(f"{sdist} is not transformers {version}'s sdist: it lacks {', '.join(missing)}")
        destination.mkdir(exist_ok=True)
        for name, member in found.items():
            (destination / members[name]).write_bytes(archive.extractfile(member).read())
    for relative, text in STAND_INS.items():
        path = destination / relative
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        (path.parent / "__init__.py").touch()
    (destination / "__init__.py").write_text(f'"""transformers {version}\'s common tests (tests/ of its sdist)."""\n')
    (destination / VERSION_FILE).write_text(version + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="transformers' sdist (.tar.gz) to read instead of downloading it")
    args = parser.parse_args(argv)
    version = transformers.__version__
    if args.sdist is not None:
        if not args.sdist.is_file():
            sys.exit(f"--sdist {args.sdist}: no such file")
        extract(args.sdist, version, DESTINATION)
    else:
        with tempfile.TemporaryDirectory() as directory:
            extract(download_sdist(version, Path(directory)), version, DESTINATION)
    print(f"transformers {version}'s common tests are in {DESTINATION.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()

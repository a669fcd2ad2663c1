"""The README and docs/ stay short, runnable and pointing at files that exist; the quick start's audio ships."""

import re
import runpy
from pathlib import Path

import pytest

from modeling_whisper_moe import load_audio

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
README_MAX_LINES = 150
# CI (.ci/run) runs exactly this line; the README must show it verbatim
TEST_COMMAND = "ruff check . && ruff format --check . && python -m pytest"
SHIPPED_AUDIO = REPO_ROOT / "examples" / "jfk.flac"
JFK_SECONDS = 11.0
SAMPLING_RATE = 16_000
# Paths into the repository start with one of these folders; anything else in backticks (outputs/, checkpoints/,
# ../shared/data, Hub ids, OUT/...) is made at run time or lives outside the clone.
REPO_FOLDERS = (
    "configuration",
    "docs",
    "examples",
    "modeling_whisper_moe",
    "processing",
    "results",
    "scripts",
    "spaces",
    "tests",
)
PATH_PATTERN = re.compile(rf"(?<![\w./-])((?:{'|'.join(REPO_FOLDERS)})/[\w.*/-]*)")
LINK_PATTERN = re.compile(r"\]\(([^)\s]+)\)")
HEADING_PATTERN = re.compile(r"^#+\s+(.+?)\s*$", re.MULTILINE)


def repo_paths(text: str) -> set[str]:
    """Every `folder/...` path into the repository the text names, in code spans, code blocks or prose."""
    return {match.rstrip(".,:;") for match in PATH_PATTERN.findall(text)}


def exists_in_repo(path: str) -> bool:
    """True when `path` (relative to the root; may hold `*`) names at least one file or folder of the repository."""
    path = path.rstrip("/")
    if "*" in path:
        return any(REPO_ROOT.glob(path))
    return (REPO_ROOT / path).exists()


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def documents() -> list[Path]:
    return [README, *DOCS]


def test_docs_folder_has_the_three_guides():
    assert {path.name for path in DOCS} >= {"RESULTS.md", "TRAINING.md", "INFERENCE.md"}


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES}"


def test_readme_shows_the_ci_test_command_verbatim():
    readme_lines = [line.strip() for line in README.read_text().splitlines()]
    assert TEST_COMMAND in readme_lines
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci_lines, ".ci/run must run the README's test command"


@pytest.mark.parametrize("document", documents(), ids=lambda path: path.name)
def test_every_repository_path_exists(document: Path):
    paths = repo_paths(document.read_text())
    missing = sorted(path for path in paths if not exists_in_repo(path))
    assert not missing, f"{document.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("document", documents(), ids=lambda path: path.name)
def test_every_relative_link_resolves(document: Path):
    headings_by_file = {path: {anchor(h) for h in HEADING_PATTERN.findall(path.read_text())} for path in documents()}
    broken = []
    for target in LINK_PATTERN.findall(document.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, fragment = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(target)
        elif fragment and fragment not in headings_by_file.get(linked, set()):
            broken.append(target)
    assert not broken, f"{document.name} has broken links: {broken}"


def test_path_checks_can_fail():
    """The checks above see paths in code spans and code blocks, and reject a missing file."""
    text = "see `docs/NOPE.md` and\n```bash\npython scripts/train.py configuration/recipes/nope.json\n```"
    assert repo_paths(text) == {"docs/NOPE.md", "scripts/train.py", "configuration/recipes/nope.json"}
    assert not exists_in_repo("docs/NOPE.md")
    assert not exists_in_repo("configuration/recipes/nope-*.json")
    assert exists_in_repo("configuration/recipes/*.json")
    assert repo_paths("outputs/fsdd-moe ../shared/data/fsdd/manifest.csv you/whisper-moe-base") == set()


def test_the_two_entry_points_and_tools_are_documented():
    text = "\n".join(path.read_text() for path in documents())
    for script in ("train.py", "evaluate.py", "benchmark.py", "expert_usage.py", "app.py", "gpu_check.py"):
        assert f"scripts/{script}" in text, f"scripts/{script} is not documented"
    assert "scripts/quickstart.sh" in README.read_text()


def test_quickstart_defaults_to_the_shipped_audio():
    script = (REPO_ROOT / "scripts" / "quickstart.sh").read_text()
    default = re.search(r'^audio="([^"$]+)"', script, re.MULTILINE)
    assert default is not None, "scripts/quickstart.sh sets no default audio"
    assert (REPO_ROOT / default.group(1)).resolve() == SHIPPED_AUDIO.resolve()
    assert "../shared" not in script, "the quick start must run on a machine that has only the clone"


def test_shipped_audio_loads_and_lasts_eleven_seconds():
    waveform = load_audio(SHIPPED_AUDIO, SAMPLING_RATE)
    assert waveform.ndim == 1
    assert len(waveform) / SAMPLING_RATE == pytest.approx(JFK_SECONDS, abs=0.1)
    assert 0.01 < float(abs(waveform).max()) <= 1.0  # speech, not silence or clipped garbage
    assert (REPO_ROOT / "examples" / "README.md").is_file(), "the shipped audio needs its source and licence"


DOCUMENTED_SCRIPTS = ("benchmark.py", "evaluate.py", "expert_usage.py")
FLAG_PATTERN = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def documented_flags(script: str) -> dict[str, set[str]]:
    """flag -> the documents whose `python scripts/SCRIPT ...` command lines (continued over backslashes) use it."""
    flags: dict[str, set[str]] = {}
    for document in [README, *DOCS]:
        for line in document.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
            _, found, rest = line.partition(f"scripts/{script}")
            command = re.split(r"&&|;|\|", rest)[0] if found else ""
            for flag in FLAG_PATTERN.findall(command):
                flags.setdefault(flag, set()).add(document.name)
    return flags


@pytest.mark.parametrize("script", DOCUMENTED_SCRIPTS)
def test_documented_command_lines_use_flags_the_script_has(script: str, capsys):
    """A command copied from the docs runs: every flag it passes is one the script's parser knows."""
    flags = documented_flags(script)
    assert flags, f"no documented command runs scripts/{script}"
    main = runpy.run_path(str(REPO_ROOT / "scripts" / script), run_name="documented")["main"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    known = set(FLAG_PATTERN.findall(capsys.readouterr().out))
    unknown = {flag: sorted(documents) for flag, documents in flags.items() if flag not in known}
    assert not unknown, f"scripts/{script} has no such flags: {unknown}"

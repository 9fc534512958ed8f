"""docs/architecture.md maps every folder of the repository: a folder added without a line there
fails here, so the page stays true."""

from __future__ import annotations

import subprocess

from support import REPO

DOC = REPO / "docs" / "architecture.md"


def folders() -> set[str]:
    """Every folder holding a file git tracks or would track (untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found: set[str] = set()
    for path in listed:
        parts = path.split("/")[:-1]
        found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return found


def test_every_folder_is_in_the_architecture_page() -> None:
    text = DOC.read_text()
    missing = []
    for folder in sorted(folders()):
        named = f"`{folder}/`" in text or f"`{folder}`" in text
        if folder.startswith("tests/"):  # the tests row names its subfolders
            named = named or f"`{folder.removeprefix('tests/')}/`" in text
        if not named:
            missing.append(folder)
    assert not missing, f"docs/architecture.md does not map: {', '.join(missing)}"

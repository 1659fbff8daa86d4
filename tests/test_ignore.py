"""What a package leaves out: git's own ignore rules (via pathspec), on a real folder."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from unitedllm_build.ignore import IgnoreRules, parse_ignore_option


def kept(folder: Path, rules: IgnoreRules) -> set[str]:
    out = set()
    for path in folder.rglob("*"):
        rel = PurePosixPath(path.relative_to(folder).as_posix())
        if path.is_file() and not any(
            rules.ignored(PurePosixPath(*rel.parts[: i + 1]), folder.joinpath(*rel.parts[: i + 1]))
            for i in range(len(rel.parts))
        ):
            out.add(rel.as_posix())
    return out


def make(folder: Path, files: list[str]) -> None:
    for rel in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("x\n")


def test_folder_only_patterns_leave_files_of_that_name(tmp_path: Path) -> None:
    make(tmp_path, ["build/out.txt", "src/build", "src/build.py", "deep/a/build/x.txt"])
    (tmp_path / ".gitignore").write_text("build/\n")
    got = kept(tmp_path, IgnoreRules.for_folder(tmp_path, []))
    assert got == {".gitignore", "src/build", "src/build.py"}


def test_double_star_and_anchored_patterns_follow_git(tmp_path: Path) -> None:
    make(tmp_path, ["a/x.ckpt", "a/b/c/x.ckpt", "top.log", "sub/top.log", "data/raw/1.bin", "data/1.bin"])
    (tmp_path / ".gitignore").write_text("**/*.ckpt\n/top.log\ndata/*.bin\n")
    got = kept(tmp_path, IgnoreRules.for_folder(tmp_path, []))
    # data/*.bin: a star does not cross a slash (git's rule, not fnmatch's)
    assert got == {".gitignore", "sub/top.log", "data/raw/1.bin"}


def test_user_globs_and_defaults_match_at_any_depth(tmp_path: Path) -> None:
    make(
        tmp_path,
        ["keep.py", "pkg/__pycache__/m.pyc", "pkg/big.safetensors", "models/w.safetensors", "run.py"],
    )
    rules = IgnoreRules.for_folder(tmp_path, parse_ignore_option("*.safetensors, run.py"))
    assert kept(tmp_path, rules) == {"keep.py"}

"""README.md and docs/*.md say what the code does: their links resolve, and the settings and commands they show exist.

Docs drift when a page, a heading, a setting or a converter format is renamed. Each failure names the file, the line
and the fix. Commands are read from code: fenced and indented code blocks, and inline code spans.
"""

import ast
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETTINGS_HEADER = "| constant | default | meaning |"  # the settings table in README.md
COMMAND_ENDS = {"&&", "||", ";", "|", ">", ">>"}
INLINE_CODE = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def train_dual_constants() -> dict:
    """The settings of train_dual.py, read from its source (importing it loads torch): the upper-case constants
    assigned before its `SETTINGS = ...` line, which collects them the same way."""
    constants = {}
    for node in ast.parse((ROOT / "train_dual.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "SETTINGS":
                return constants
            if name.isupper():
                constants[name] = ast.literal_eval(node.value)
    raise AssertionError("train_dual.py has no `SETTINGS = ...` line after its constants; this test reads up to it")


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def parse(path: Path) -> tuple[list, list]:
    """(code, prose) of a Markdown file: code as (line, text) for each line of a fenced or indented code block and
    each inline code span; prose as (first line, text) for each paragraph, heading or table."""
    code, prose, paragraph = [], [], []
    fenced, previous_blank = False, True

    def end_paragraph():
        if paragraph:
            start, text = paragraph[0][0], "\n".join(line for _, line in paragraph)
            for span in INLINE_CODE.finditer(text):
                code.append((start + text.count("\n", 0, span.start()), span[2].replace("\n", " ")))
            prose.append((start, text))
            paragraph.clear()

    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            end_paragraph()
            fenced = not fenced
        elif fenced or (line.startswith("    ") and previous_blank and not paragraph):
            code.append((number, line))
            continue  # an indented block goes on while its lines are indented: previous_blank stays as it was
        elif not line.strip():
            end_paragraph()
        else:
            paragraph.append((number, line))
        previous_blank = not line.strip()
    end_paragraph()
    return code, prose


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation (backticks, dots, colons...) dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen, result = {}, set()
    for _, text in parse(path)[1]:
        for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.MULTILINE):
            base = slug(heading)
            result.add(f"{base}-{seen[base]}" if base in seen else base)  # GitHub numbers repeated headings
            seen[base] = seen.get(base, 0) + 1
    return result


def test_relative_links_resolve():
    """Every relative link and image in README.md and docs/ points at a file that exists, and at a heading of it."""
    failures = []
    for page in PAGES:
        for start, text in parse(page)[1]:
            text = INLINE_CODE.sub(lambda code: re.sub(r"[^\n]", " ", code[0]), text)  # links in code are not links
            for link in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)", text):
                target, line = link[1], start + text.count("\n", 0, link.start())
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not relative
                    continue
                file, _, anchor = target.partition("#")
                path = (page.parent / file).resolve() if file else page
                if not path.exists():
                    failures.append(
                        f"{where(page, line)}: link {target} points at {file}, which does not exist; "
                        "fix the path (relative to this file) or restore the file"
                    )
                elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
                    failures.append(
                        f"{where(page, line)}: link {target}: {file or page.name} has no heading with "
                        f"the anchor #{anchor}; use one of {sorted(anchors(path))}"
                    )
    assert not failures, "\n".join(failures)


def test_train_dual_commands_name_settings():
    """Every NAME=value after `train_dual.py` in a command names a constant of train_dual.py, which would otherwise
    refuse it. Environment variables before the command (`YOLOFUSE_CPU_DDP=2 python train_dual.py`) are not
    settings and are not checked."""
    constants, failures = train_dual_constants(), []
    for page in PAGES:
        for line, text in parse(page)[0]:
            for command in re.finditer(r"train_dual\.py\b(.*)", text):
                try:
                    words = shlex.split(command[1], comments=True)
                except ValueError:  # an unclosed quote: words are enough here
                    words = command[1].split()
                for word in words:
                    if word in COMMAND_ENDS:
                        break
                    name = re.match(r"(\w+)=", word)
                    if name and name[1] not in constants:
                        failures.append(
                            f"{where(page, line)}: `{word}` after train_dual.py: {name[1]} is not a "
                            f"setting of train_dual.py; use one of {', '.join(constants)}, or add it there"
                        )
    assert not failures, "\n".join(failures)


def settings_table() -> list[tuple[int, list[str], str]]:
    """(line, constant names, default) of each row of README.md's settings table."""
    lines = (ROOT / "README.md").read_text().splitlines()
    header = next((n for n, line in enumerate(lines) if line.strip() == SETTINGS_HEADER), None)
    assert header is not None, f"README.md has no settings table; its header must read {SETTINGS_HEADER}"
    rows = []
    for n in range(header + 2, len(lines)):  # after the header and its |---| line
        if not lines[n].startswith("|"):
            break
        cells = [cell.strip() for cell in lines[n].strip("|").split("|")]
        rows.append((n + 1, re.findall(r"`(\w+)`", cells[0]), cells[1]))
    return rows


def test_settings_table_matches_train_dual_constants():
    """README.md's settings table lists every constant of train_dual.py, nothing else, each with its default."""
    constants, failures, listed = train_dual_constants(), [], set()
    for line, names, default in settings_table():
        defaults = [d.strip() for d in default.split(",")] if len(names) > 1 else [default]  # `BATCH`, `NBS`
        if len(defaults) != len(names):
            failures.append(f"README.md:{line}: {len(names)} settings but {len(defaults)} defaults; give one each")
        for name, shown in zip(names, defaults):
            listed.add(name)
            if name not in constants:
                failures.append(
                    f"README.md:{line}: {name} is in the settings table but is not a constant of "
                    "train_dual.py; remove the row or add the constant"
                )
                continue
            value, shown = constants[name], shown.strip("`").strip("\"'")
            try:
                same = shown == value if isinstance(value, str) else ast.literal_eval(shown) == value
            except (ValueError, SyntaxError):
                same = False
            if not same:
                failures.append(
                    f"README.md:{line}: the settings table shows {name} = {shown}, train_dual.py has "
                    f"{value!r}; write {value!r} in the table"
                )
    for name in constants.keys() - listed:
        failures.append(f"README.md: train_dual.py's constant {name} is not in the settings table; add a row for it")
    assert not failures, "\n".join(failures)


def test_prepare_commands_name_formats():
    """Every `python -m yolofuse.prepare FORMAT ...` shown names a format the converter has."""
    from yolofuse.prepare import SCANNERS  # the formats its command line accepts

    failures = []
    for page in PAGES:
        for line, text in parse(page)[0]:
            for command in re.finditer(r"python -m yolofuse\.prepare +(\S+)", text):
                fmt = command[1]
                if fmt.startswith("-") or fmt.isupper():  # an option (--help), or the placeholder FORMAT
                    continue
                if fmt not in SCANNERS:
                    failures.append(
                        f"{where(page, line)}: `python -m yolofuse.prepare {fmt}`: no such format; "
                        f"use one of {', '.join(SCANNERS)}"
                    )
    assert not failures, "\n".join(failures)

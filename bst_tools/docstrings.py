"""Held-out English for evaluation: the docstrings of a Python standard library, one document per module.

Real technical prose, available offline on every machine, and disjoint from the books scripts/upcycle.py trains on.
The text is whatever the interpreter ships, so two machines with different Pythons score different text. This module
needs nothing outside the standard library, so another interpreter can list its own docstrings
(`python3.12 -m bst_tools.docstrings` prints them as JSON; `documents_of("python3.12")` reads them): that is how
scripts/evaluate_length.py --docstrings_python scores the same tokens as a run on a machine with that Python.
"""

import ast
import json
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

SKIPPED_FOLDERS = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
MINIMUM_CHARACTERS = 200


def stdlib_docstring_documents():
    """One document per module of the running Python's standard library (test suites, IDLE and site-packages left out,
    files in sorted order): its module, class and function docstrings in source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if any(part in SKIPPED_FOLDERS for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [node for node in ast.walk(tree) if isinstance(node, (ast.ClassDef, ast.FunctionDef))]
        docstrings = [ast.get_docstring(node) for node in nodes]
        text = "\n\n".join(docstring for docstring in docstrings if docstring)
        if len(text) >= MINIMUM_CHARACTERS:
            yield text


def documents_of(python=None):
    """(documents, version) of this interpreter's standard library, or of the interpreter `python` (a command or a
    path), which parses its own library: a library's syntax may be newer than this interpreter's parser."""
    if python is None:
        return list(stdlib_docstring_documents()), platform.python_version()
    try:
        listed = subprocess.run([python, "-m", "bst_tools.docstrings"], capture_output=True, text=True, check=False,
                                cwd=Path(__file__).resolve().parents[1])
    except FileNotFoundError as error:
        raise ValueError(f"--docstrings_python {python}: no such interpreter ({error}).") from None
    if listed.returncode != 0:
        raise ValueError(f"--docstrings_python {python} could not list its docstrings: {listed.stderr[-500:]}")
    payload = json.loads(listed.stdout)
    return payload["documents"], payload["version"]


if __name__ == "__main__":
    json.dump({"version": platform.python_version(), "documents": list(stdlib_docstring_documents())}, sys.stdout)

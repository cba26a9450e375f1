"""The offline default corpus: English prose that ships with every CPython install.

Documents are (1) the topics of the Python language reference bundled as `pydoc_data.topics`
(what `help("if")` shows) and (2) every module, class and function docstring longer than 40
characters in the standard library sources, read with `ast` (nothing is imported). On CPython 3.11
that is ~6k documents, ~2 MB of text. The same procedure on the same Python version gives the same
corpus; no download is ever needed.
"""

import ast
import sysconfig
from pathlib import Path

from datasets import Dataset, DatasetDict

from ethos.data.text import TextDataModule

SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}


KINDS = {ast.Module: "module", ast.ClassDef: "class", ast.FunctionDef: "function", ast.AsyncFunctionDef: "function"}


def stdlib_docstrings(min_chars: int = 40):
    """(source file relative to the stdlib, kind of object, docstring) for every docstring longer than
    `min_chars` in the standard library, files in sorted order, nodes in `ast.walk` order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            kind = KINDS.get(type(node))
            doc = ast.get_docstring(node) if kind else None
            if doc and len(doc) > min_chars:
                yield rel, kind, doc


def python_docs_corpus(min_chars: int = 40) -> list[str]:
    import pydoc_data.topics  # 1 MB of text: only when the offline corpus is built

    docs = [v.strip() for _, v in sorted(pydoc_data.topics.topics.items())]
    return docs + [doc for _, _, doc in stdlib_docstrings(min_chars)]


class TinyTextDataModule(TextDataModule):
    """`data=tiny`: masked LM on the Python documentation corpus with a locally trained WordPiece."""

    def load_documents(self) -> DatasetDict:
        return DatasetDict(train=Dataset.from_dict({"text": python_docs_corpus()}))

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


def python_docs_corpus(min_chars: int = 40) -> list[str]:
    import pydoc_data.topics

    docs = [v.strip() for _, v in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > min_chars:
                    docs.append(doc)
    return docs


class TinyTextDataModule(TextDataModule):
    """`data=tiny`: masked LM on the Python documentation corpus with a locally trained WordPiece."""

    def load_documents(self) -> DatasetDict:
        return DatasetDict(train=Dataset.from_dict({"text": python_docs_corpus()}))

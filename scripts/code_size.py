"""Code size of a package, for structure reviews: modules and lines, the largest modules and functions.

python scripts/code_size.py [flareseg]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def main(root: Path) -> None:
    files = sorted(root.rglob("*.py"))
    lengths = {path: len(path.read_text().splitlines()) for path in files}
    functions = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.name}"))
    functions.sort(reverse=True)
    largest = sorted(((n, str(p.relative_to(root))) for p, n in lengths.items()), reverse=True)[:5]
    print(f"{len(files)} modules, {sum(lengths.values())} lines")
    print(
        f"modules over 400 lines: {sum(n > 400 for n in lengths.values())}; functions over 60 lines: "
        f"{sum(n > 60 for n, _ in functions)}"
    )
    print("largest modules:", ", ".join(f"{name} {n}" for n, name in largest))
    print("largest functions:", ", ".join(f"{name} {n}" for n, name in functions[:5]))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "flareseg"))

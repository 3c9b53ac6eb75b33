#!/usr/bin/env python3
"""Issue 15's structure audit, rerunnable on any checkout.

    e2e/scripts/audit.py [DIR]              # the tree at DIR (default: the repo)
    e2e/scripts/audit.py --rev REV          # a commit, exported to a temp dir
    e2e/scripts/audit.py --check            # exit 1 on a cycle or an unexplained long file

It reports, over the Rust sources outside generated code (`proto/src/gen`)
and build output:

- the number of `.rs` files;
- the ten longest functions (lines from `fn` to its closing brace), of
  all code and of the crates' `src/` outside tests, and how many of the
  latter pass 120 lines;
- import cycles between modules: for every `crate::`, `super::` and `self::`
  path a file names (in `use` lines or inline), an edge from the file's
  module to the module the path resolves to, lifted to the two children of
  their lowest common ancestor (a parent using its own child is not a
  cycle; `capsule::a` using `state::b` is `capsule -> state`). Code under
  `#[cfg(test)]` is left out: a test reaching into a sibling is not a
  design cycle. A cycle is a strongly connected set of siblings;
- files over 700 lines, and whether their `//!` header states why.

The module graph is built from file paths and `mod` declarations' files
only (no `#[path]`), which is how this repository lays modules out; the
parse is textual (comments, strings and char literals blanked first), not
rustc's, so treat a reported cycle as a place to look.
"""

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict

GENERATED = ("proto/src/gen/",)
LONG = 700
# A non-test function longer than this is a candidate to split.
LONG_FN = 120
# A long file's header says why in a sentence starting "Why this file is long:".
REASON_WORDS = re.compile(r"(?i)(why this file is long|over ~?700 lines on purpose)")


def rust_files(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [
            d
            for d in dirnames
            if d not in ("target", ".git", "node_modules") and not d.startswith(".")
        ]
        for f in filenames:
            if f.endswith(".rs"):
                p = os.path.normpath(os.path.join(rel, f))
                if not p.startswith(GENERATED):
                    out.append(p)
    return sorted(out)


def blank(src):
    """Comments, strings and char literals replaced by spaces (newlines
    kept), so braces and paths inside them do not count."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'r(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"' or (c == "b" and src.startswith('b"', i)):
            j = i + (2 if c == "b" else 1)
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def match_brace(text, open_at):
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(text) - 1


def strip_cfg_test(text):
    """`#[cfg(test)]` items (modules, functions) blanked."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]", text)
        if not m:
            return text
        j = m.end()
        semi, brace = text.find(";", j), text.find("{", j)
        if brace < 0 or (0 <= semi < brace):
            end = semi
        else:
            end = match_brace(text, brace)
        text = text[: m.start()] + re.sub(r"[^\n]", " ", text[m.start() : end + 1]) + text[end + 1 :]


FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def functions(path, text):
    for m in FN.finditer(text):
        brace, semi = text.find("{", m.end()), text.find(";", m.end())
        if brace < 0 or (0 <= semi < brace):
            continue  # a declaration without a body
        end = match_brace(text, brace)
        first = text.count("\n", 0, m.start()) + 1
        last = text.count("\n", 0, end) + 1
        yield last - first + 1, f"{path}:{first}", m.group(1)


def crate_of(path):
    """(crate dir, module path of the file) for files under a crate's src/;
    None for tests, benches, examples and build scripts (their own crates)."""
    parts = path.split("/")
    if "src" not in parts:
        return None
    k = parts.index("src")
    crate, rest = "/".join(parts[:k]), parts[k + 1 :]
    if rest[-1] in ("lib.rs", "main.rs") and len(rest) == 1:
        return crate + ("#bin" if rest[-1] == "main.rs" else ""), ()
    if rest[0] == "bin":
        return None
    mods = rest[:-1] + ([] if rest[-1] == "mod.rs" else [rest[-1][:-3]])
    return crate, tuple(mods)


TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;")
PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{)")


def use_paths(text):
    """Every `crate::`/`super::`/`self::` path, `use` trees expanded."""
    paths = []
    for m in re.finditer(r"\buse\s+([^;]*);", text):
        paths += expand(re.sub(r"\s+", "", m.group(1)))
    for m in PATH.finditer(text):
        if m.group(2) != "::{":
            paths.append(m.group(1) + m.group(2))
    return paths


def expand(tree):
    """`a::{b, c::{d, e}}` -> a::b, a::c::d, a::c::e."""
    i = tree.find("{")
    if i < 0:
        return [tree.split(" as ")[0]]
    prefix, inner = tree[:i], tree[i + 1 : tree.rfind("}")]
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    items.append(cur)
    out = []
    for it in filter(None, items):
        if it == "self" or it.startswith("selfas"):
            out.append(prefix.rstrip(":"))
        else:
            out += expand(prefix + it)
    return out


def resolve(path, here, modules):
    segs = path.split("::")
    if segs[0] == "crate":
        base, segs = (), segs[1:]
    else:
        base = here
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
    best = base
    for k in range(1, len(segs) + 1):
        if base + tuple(segs[:k]) in modules:
            best = base + tuple(segs[:k])
        else:
            break
    return best


def cycles(root, files):
    by_crate = defaultdict(dict)
    for f in files:
        c = crate_of(f)
        if c:
            by_crate[c[0]][c[1]] = f
    found = []
    for crate, mods in sorted(by_crate.items()):
        modules = set(mods)
        # Modules declared under `#[cfg(test)]` (`mod tests;`, `mod
        # fixtures;`) and everything below them are test code.
        test_only = set()
        for mod, f in mods.items():
            raw = blank(open(os.path.join(root, f), errors="replace").read())
            for m in TEST_MOD.finditer(raw):
                test_only.add(mod + (m.group(1),))
        edges = defaultdict(set)
        for mod, f in mods.items():
            if any(mod[: len(t)] == t for t in test_only):
                continue
            text = strip_cfg_test(blank(open(os.path.join(root, f), errors="replace").read()))
            for p in use_paths(text):
                if p.split("::")[0] == "crate" and crate.endswith("#bin"):
                    continue
                to = resolve(p, mod, modules)
                k = 0
                while k < min(len(mod), len(to)) and mod[k] == to[k]:
                    k += 1
                if k < len(mod) and k < len(to):
                    edges[mod[: k + 1]].add(to[: k + 1])
        found += [(crate, scc) for scc in sccs(edges) if len(scc) > 1]
    return found


def sccs(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    nodes = set(edges) | {b for v in edges.values() for b in v}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def header(src):
    lines = []
    for line in src.splitlines():
        s = line.strip()
        if s.startswith("//!"):
            lines.append(s[3:].strip())
        elif s.startswith("#!") or not s:
            continue
        else:
            break
    return " ".join(lines)


def audit(root):
    files = rust_files(root)
    fns, src_fns, long_files = [], [], []
    for f in files:
        src = open(os.path.join(root, f), errors="replace").read()
        text = blank(src)
        fns += functions(f, text)
        if "/src/" in f and not re.search(r"(^|/)tests?(/|\.rs$)", f.split("/src/", 1)[1]):
            src_fns += functions(f, strip_cfg_test(text))
        n = src.count("\n")
        if n > LONG:
            h = header(src)
            long_files.append((n, f, bool(REASON_WORDS.search(h))))
    fns.sort(key=lambda x: (-x[0], x[1]))
    src_fns.sort(key=lambda x: (-x[0], x[1]))
    long_files.sort(reverse=True)
    return {
        "files": len(files),
        "functions": fns[:10],
        "src_functions": src_fns[:10],
        "src_over": sum(1 for n, _, _ in src_fns if n > LONG_FN),
        "cycles": cycles(root, files),
        "long": long_files,
    }


def show(name, r):
    print(f"## {name}")
    print(f"files (.rs, outside generated code): {r['files']}")
    print("longest functions:")
    for n, where, fn in r["functions"]:
        print(f"  {n:5}  {fn}  {where}")
    print("longest functions outside tests (crates' src/, no #[cfg(test)] code):")
    for n, where, fn in r["src_functions"]:
        print(f"  {n:5}  {fn}  {where}")
    print(f"functions outside tests over {LONG_FN} lines: {r['src_over']}")
    print(f"import cycles: {len(r['cycles'])}")
    for crate, scc in r["cycles"]:
        print(f"  {crate}: " + " <-> ".join("::".join(m) for m in scc))
    print(f"files over {LONG} lines: {len(r['long'])}")
    for n, f, why in r["long"]:
        print(f"  {n:5}  {f}{'' if why else '  (no reason at its top)'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", default=os.path.join(os.path.dirname(__file__), "../.."))
    ap.add_argument("--rev", help="audit this commit instead (git archive)")
    ap.add_argument("--check", action="store_true", help="exit 1 on a cycle or an unexplained long file")
    a = ap.parse_args()
    root = os.path.abspath(a.dir)
    name = root
    tmp = None
    if a.rev:
        tmp = tempfile.TemporaryDirectory()
        data = subprocess.run(
            ["git", "-C", root, "archive", "--format=tar", a.rev], check=True, capture_output=True
        ).stdout
        with tempfile.TemporaryFile() as t:
            t.write(data)
            t.seek(0)
            tarfile.open(fileobj=t).extractall(tmp.name, filter="data")
        root, name = tmp.name, a.rev
    r = audit(root)
    show(name, r)
    if a.check and (r["cycles"] or any(not why for _, _, why in r["long"])):
        sys.exit(1)


if __name__ == "__main__":
    main()

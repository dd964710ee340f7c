"""Pass `recursion`: lets, defs and rewards may not refer to themselves, directly or through others."""

from __future__ import annotations

from ralign import nodes as n
from ralign.check.context import Context, Symbol, Work
from ralign.check.names import lookup

PROGRAMS = ("let", "def", "reward")
MAX_CHAIN = 200  # lets, defs and rewards that refer one to the next (typing recurses along a chain)


def recursion(ctx: Context) -> Context:
    """Report every cycle among lets, defs and rewards; their members are left out of typing."""
    w = Work(ctx)
    graph, decls = _graph(ctx)
    cyclic: set[str] = set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if start in state:
            continue
        path, todo = [start], [iter(graph[start])]
        state[start] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt) :]
                cyclic.update(cycle)
                _report(w, decls[nxt], [decls[c] for c in (*cycle, nxt)], len(cycle))
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(graph.get(nxt, ())))
    # Members of an over-deep chain are left out of typing like cycles (typing recurses along one).
    cyclic |= _too_deep(w, graph, decls, cyclic)
    return w.finish(cyclic=frozenset(cyclic))


def _too_deep(
    w: Work, graph: dict[str, list[str]], decls: dict[str, Symbol], cyclic: set[str]
) -> set[str]:
    """Report the head of any chain longer than MAX_CHAIN; returns the chains' members."""
    edges = {
        q: [x for x in graph[q] if x in graph and x not in cyclic] for q in graph if q not in cyclic
    }
    depth: dict[str, int] = {}
    for start in edges:
        stack = [(start, False)]
        while stack:  # post-order: a node's depth once all it refers to have theirs
            q, ready = stack.pop()
            if q in depth:
                continue
            if ready:
                depth[q] = 1 + max((depth[x] for x in edges[q]), default=0)
                continue
            stack.append((q, True))
            stack.extend((x, False) for x in edges[q] if x not in depth)
    deep = [q for q in edges if depth[q] > MAX_CHAIN]
    referenced = {x for q in deep for x in edges[q]}
    for q in deep:
        if q not in referenced:
            w.error(
                decls[q].decl.span,
                f"the declarations refer to one another too deeply to check: '{decls[q].decl.name}' starts "
                f"a chain of {depth[q]:,} lets, defs or rewards (at most {MAX_CHAIN} are allowed)",
            )
    return set(deep)


def _graph(ctx: Context) -> tuple[dict[str, list[str]], dict[str, Symbol]]:
    """qname -> the lets, defs and rewards its body names, and qname -> symbol."""
    graph: dict[str, list[str]] = {}
    decls: dict[str, Symbol] = {}
    for unit, table in ctx.symbols.items():
        for sym in table.values():
            if sym.keyword not in PROGRAMS:
                continue
            decls[sym.qname] = sym
            local = set(sym.decl.params) if sym.keyword == "def" else set()
            edges = []
            for ref in n.refs(n.bodies(sym.decl)):
                if len(ref.parts) == 1 and (
                    ref.parts[0] in local or ref.parts[0] in ("prompt", "response")
                ):
                    continue
                if len(ref.parts) == 1 and ref.parts[0] not in table:
                    continue  # a builtin or an unknown name (reported later): no edge
                found = lookup(ctx, unit, ref)
                if isinstance(found, Symbol) and found.keyword in PROGRAMS:
                    edges.append(found.qname)
            graph[sym.qname] = edges
    return graph, decls


def _report(w: Work, sym: Symbol, chain: list[Symbol], length: int) -> None:
    names = " -> ".join(s.decl.name for s in chain)
    what = "calls itself" if length == 1 else "is part of a cycle"
    w.error(
        sym.decl.span,
        f"'{sym.decl.name}' is recursive: it {what} ({names}); a {sym.keyword} may not recur, directly or through others",
    )

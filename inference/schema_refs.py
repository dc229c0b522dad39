"""A JSON schema's nesting and $refs, checked before the grammar engine (llguidance) sees it. The
engine resolves a $ref only when generation reaches it, so a loop (`#/$defs/a` -> itself) would
compile and then fail mid-generation; and it recurses through nesting and $refs on the thread's
stack, where a long chain of $refs (~1,200 levels) crashes the process. Here each $ref reachable
from the root must allow a finite value, and no path may pass MAX_SCHEMA_LEVELS subschemas."""

import copy
from urllib.parse import unquote

MAX_SCHEMA_LEVELS = 256  # subschemas on one path through nesting and $refs (a loop counts once)

_ONE = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else")
_ONE += ("propertyNames", "unevaluatedItems", "unevaluatedProperties")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems")
_NAMED = ("properties", "patternProperties", "dependentSchemas")


def schema_problem(schema: dict) -> str | None:
    """What makes `schema` unfit for the engine: nesting and $refs too deep for it, or a $ref
    that no finite value satisfies; None if nothing does."""
    deep = levels(schema)
    if deep > MAX_SCHEMA_LEVELS:
        return f"it nests subschemas and $refs {deep} levels deep; the limit is {MAX_SCHEMA_LEVELS}"
    return ref_loop(schema)


def levels(root: dict) -> int:
    """The most subschemas on one path from `root` through nesting and $refs, where a loop of
    $refs counts each of its subschemas once: a bound on the engine's recursion. Tarjan's
    strongly connected components without recursion, then the longest path over them."""
    order: dict[int, int] = {}  # id(subschema) -> when it was reached
    low: dict[int, int] = {}
    component: dict[int, int] = {}  # id(subschema) -> its component, once known
    deepest: list[int] = []  # per component: the most subschemas on a path from it
    stack: list[dict] = []
    work: list = []

    def edges(s: dict) -> list[dict]:
        return [c for c in [*_children(s), _target(root, s.get("$ref"))] if isinstance(c, dict)]

    def reach(s: dict) -> None:
        order[id(s)] = low[id(s)] = len(order)
        stack.append(s)
        work.append((s, iter(edges(s))))

    reach(root)
    while work:
        s, pending = work[-1]
        for c in pending:
            if id(c) not in order:
                reach(c)
                break
            if id(c) not in component:  # on the stack: in a loop with s
                low[id(s)] = min(low[id(s)], order[id(c)])
        else:
            work.pop()
            if work:
                low[id(work[-1][0])] = min(low[id(work[-1][0])], low[id(s)])
            if low[id(s)] == order[id(s)]:
                members = []
                while not members or members[-1] is not s:
                    members.append(stack.pop())
                    component[id(members[-1])] = len(deepest)
                here = len(deepest)  # edges inside the component lead to no deeper component
                below = [deepest[k] for m in members for c in edges(m) if (k := component[id(c)]) != here]
                deepest.append(len(members) + max(below, default=0))
    return deepest[component[id(root)]]


def ref_loop(schema: dict) -> str | None:
    """Why no finite JSON value satisfies `schema` or a $ref reachable from it (one that loops
    back into itself, as `#/$defs/a` -> `#/$defs/a`, or through required properties); None if
    each has one."""
    finite = _Finite(schema)
    for ref, target in finite.refs.items():
        if not finite.met(target):
            return f"$ref {ref!r} loops back into itself: no finite value satisfies it"
    return None if finite.met(schema) else "no finite JSON value satisfies it"


def rebased(schema: dict, pointer: str) -> dict:
    """`schema` as a part of a larger one, at JSON `pointer` ("/anyOf/0"): a copy whose local
    $refs point where their targets now are ("#/$defs/x" -> "#/anyOf/0/$defs/x")."""
    out = copy.deepcopy(schema)
    todo: list = [out]
    while todo:
        s = todo.pop()
        if not isinstance(s, dict):
            continue
        ref = s.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            s["$ref"] = "#" + pointer + ref[1:]
        todo += _children(s)
        todo += [d for k in ("$defs", "definitions") if isinstance(s.get(k), dict) for d in s[k].values()]
    return out


def _children(s: dict) -> list:
    """The subschemas directly inside `s` (not through $ref)."""
    out = [s[k] for k in _ONE if k in s]
    out += [x for k in _MANY if isinstance(s.get(k), list) for x in s[k]]
    out += [x for k in _NAMED if isinstance(s.get(k), dict) for x in s[k].values()]
    return [x for c in out for x in (c if isinstance(c, list) else [c])]  # draft 7's items: [...]


def _target(root: dict, ref: object) -> object | None:
    """What a local $ref ("#", "#/$defs/a") points to; None for any other (llguidance's to judge)."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        return None
    node = root
    for part in ref[2:].split("/") if ref != "#" else ():
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _needs(s: dict, root: dict) -> list[list]:
    """What a finite value of `s` needs: groups that must each be met, a group by any one of its
    subschemas. Generous where unsure (a keyword not read here needs nothing), so that only a
    schema with no finite value is ever refused."""
    need = [[t] for t in [_target(root, s.get("$ref"))] if t is not None]
    need += [[x] for x in s["allOf"]] if isinstance(s.get("allOf"), list) else []
    need += [s[k] for k in ("anyOf", "oneOf") if isinstance(s.get(k), list) and s[k]]
    types = s.get("type", [])
    if types and "const" not in s and "enum" not in s:
        ways = []
        for t in types if isinstance(types, list) else [types]:  # a value of any one type will do
            if t == "object":
                props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
                required = s.get("required") if isinstance(s.get("required"), list) else []
                ways.append([props[k] for k in required if isinstance(k, str) and k in props])
            else:
                ways.append(_items_needed(s) if t == "array" else [])
        need.append([{"allOf": w} for w in ways])
    return need


def _items_needed(s: dict) -> list:
    """The item schemas an array of `s` cannot do without (minItems, contains)."""
    first = s.get("prefixItems") if isinstance(s.get("prefixItems"), list) else []
    items, least = s.get("items", True), s.get("minItems", 0)
    if isinstance(items, list):  # draft 7's tuple form
        first, items = items, s.get("additionalItems", True)
    least = least if isinstance(least, int) else 0
    out = [first[i] if i < len(first) else items for i in range(min(least, len(first) + 1))]
    return out + ([s["contains"]] if "contains" in s and s.get("minContains", 1) != 0 else [])


class _Finite:
    """Which subschemas reachable from `root` allow a finite value: the least fixed point of
    `_needs`, solved as an and-or graph in time linear in the schema's size (no recursion)."""

    def __init__(self, root: dict):
        self.refs: dict[str, object] = {}  # each local $ref reachable from the root -> its target
        self._node: dict[int, int] = {}  # id(subschema) -> its node
        self._kept: list = []  # the subschemas, so that their ids stay theirs
        self._waiting: list[int] = []  # per node: how many of its needs are not met yet
        self._parents: list[list[int]] = []
        todo: list[dict] = []
        self._of(root, todo)
        while todo:
            s = todo.pop()
            target = _target(root, s.get("$ref"))
            if target is not None:
                self.refs.setdefault(s["$ref"], target)
            for c in _children(s) + ([target] if target is not None else []):
                self._of(c, todo)
            groups = _needs(s, root)
            me = self._node[id(s)]
            self._waiting[me] = len(groups)
            for group in groups:
                g = self._add(1, me)  # one of its subschemas will do
                for alternative in group:
                    self._parents[self._of(alternative, todo)].append(g)
        self._met = [False] * len(self._waiting)
        ready = [i for i, w in enumerate(self._waiting) if w == 0]
        while ready:
            i = ready.pop()
            if not self._met[i]:
                self._met[i] = True
                for p in self._parents[i]:
                    self._waiting[p] -= 1
                    if self._waiting[p] == 0:
                        ready.append(p)

    def _add(self, waiting: int, parent: int | None = None) -> int:
        self._waiting.append(waiting)
        self._parents.append([] if parent is None else [parent])
        return len(self._waiting) - 1

    def _of(self, s: object, todo: list) -> int:
        """The node of subschema `s`; a dict seen for the first time goes on `todo`."""
        if id(s) not in self._node:
            self._kept.append(s)
            self._node[id(s)] = self._add(1 if s is False else 0)  # false: never met
            if isinstance(s, dict):
                todo.append(s)
        return self._node[id(s)]

    def met(self, s: object) -> bool:
        """Whether subschema `s` allows a finite value."""
        return self._met[self._node[id(s)]]

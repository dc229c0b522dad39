"""Structured output at scale: fifty different random JSON schemas, asked at once with sampling,
each answer validates against its schema."""

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from tests.peers.api.compat.common import chat

pytestmark = pytest.mark.slow

WORDS = [
    "title",
    "count",
    "price",
    "active",
    "color",
    "tags",
    "owner",
    "score",
    "city",
    "level",
    "label",
    "rating",
    "enabled",
    "kind",
    "items",
    "author",
    "weight",
    "visible",
    "status",
    "notes",
    "year",
    "size",
    "flag",
    "mode",
    "origin",
]
ENUMS = [["red", "green", "blue"], ["low", "mid", "high"], ["yes", "no"], ["cat", "dog", "bird", "fish"]]


def leaf_schema(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(3, 12)}
    if kind in ("integer", "number"):
        low = rng.randint(-50, 50)
        return {"type": kind, "minimum": low, "maximum": low + rng.randint(1, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    return {"type": "string", "enum": rng.choice(ENUMS)}


def object_schema(rng: random.Random, fields: int, nested: bool) -> dict:
    names = rng.sample(WORDS, fields)
    props = {}
    for name in names:
        kind = rng.choice(["leaf", "leaf", "leaf", "array", "object"]) if nested else "leaf"
        if kind == "array":
            props[name] = {
                "type": "array",
                "items": leaf_schema(rng),
                "minItems": 1,
                "maxItems": rng.randint(1, 3),
            }
        elif kind == "object":
            props[name] = object_schema(rng, rng.randint(1, 2), nested=False)
        else:
            props[name] = leaf_schema(rng)
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def test_fifty_different_schemas_always_validate(client, model_id):
    schemas = [
        object_schema(random.Random(i), random.Random(1000 + i).randint(2, 4), nested=True) for i in range(50)
    ]
    assert len({json.dumps(s, sort_keys=True) for s in schemas}) == 50

    def one(i: int) -> tuple[str, str]:
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": f"record_{i}", "schema": schemas[i], "strict": True},
        }
        ask = f"Write one JSON object with the fields {', '.join(schemas[i]['properties'])}."
        r = chat(
            client,
            model_id,
            [{"role": "user", "content": ask}],
            max_tokens=200,
            temperature=0.7,
            seed=i,
            response_format=fmt,
        )
        return r.choices[0].message.content, r.choices[0].finish_reason

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:  # (the peers batch them: more at once, less wall time)
        outputs = list(pool.map(one, range(50)))
    print(f"50 schemas: {time.monotonic() - start:.1f} s")
    bad = []
    for i, (text, finish) in enumerate(outputs):
        try:
            jsonschema.validate(json.loads(text), schemas[i])
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append((i, finish, text, str(e)[:200]))
    assert not bad, bad

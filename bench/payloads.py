#!/usr/bin/env python3
"""Request bodies shaped like Claude Code's, made up from a seed (no real conversation data).

    bench/payloads.py OUT_DIR [--seed N]

writes, for each size in SIZES, `OUT_DIR/<size>.json` (non-streaming) and
`OUT_DIR/<size>-stream.json` (`"stream": true`), and prints one line per file with its byte size.

A Claude Code request carries: `system` as text blocks, the last one with `cache_control`; `tools`,
each with a JSON schema; a conversation of `tool_use` / `tool_result` turns that grows with the
session; `metadata.user_id` (a JSON-encoded string holding `session_id`) as the last member, as
Claude Code sends it. The sizes are reached by adding turns of tool use, so the shape stays the same
and only the history grows: ~2 KB is a first short turn without tools, ~100 KB a first turn with the
tool definitions and a dozen turns of history, ~1 MB a long session.
"""

import argparse
import json
import os
import random

SIZES = {"2k": 2_000, "100k": 100_000, "1m": 1_000_000}

WORDS = (
    "the request path gateway health endpoint failover stream event counter session cache "
    "selector budget probe queue recover eject latency token model answer client upstream "
    "config file test assert value buffer frame header body status error retry reset"
).split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def text(rng, chars):
    out = []
    size = 0
    while size < chars:
        s = sentence(rng, rng.randint(6, 18))
        out.append(s)
        size += len(s) + 1
    return " ".join(out)


def tool(rng, i):
    props = {}
    for j in range(rng.randint(2, 6)):
        props[f"param_{j}"] = {
            "type": rng.choice(["string", "integer", "boolean"]),
            "description": sentence(rng, rng.randint(8, 20)),
        }
    return {
        "name": f"Tool{i}",
        "description": text(rng, rng.randint(400, 1600)),
        "input_schema": {
            "type": "object",
            "properties": props,
            "required": sorted(props)[:1],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }


def turn(rng, i):
    """One assistant tool use and the user's tool result."""
    tool_id = f"toolu_{rng.getrandbits(64):016x}{i:04d}"
    use = {
        "role": "assistant",
        "content": [
            {"type": "text", "text": sentence(rng, rng.randint(8, 24))},
            {
                "type": "tool_use",
                "id": tool_id,
                "name": f"Tool{rng.randint(0, 17)}",
                "input": {"file_path": f"/work/src/module_{i}.rs", "limit": 200},
            },
        ],
    }
    lines = "\n".join(
        f"{n:>6}\t{sentence(rng, rng.randint(4, 14))}" for n in range(rng.randint(20, 80))
    )
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": lines}],
    }
    return [use, result]


def body(rng, target, stream):
    session = f"{rng.getrandbits(128):032x}"
    system = [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
        {
            "type": "text",
            "text": text(rng, min(12_000, target // 8)),
            "cache_control": {"type": "ephemeral"},
        },
    ]
    b = {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "system": system,
        "messages": [{"role": "user", "content": sentence(rng, 20)}],
    }
    if target > 10_000:
        b["tools"] = [tool(rng, i) for i in range(18)]
    b["stream"] = stream
    b["metadata"] = {
        "user_id": json.dumps(
            {"device_id": f"{rng.getrandbits(64):016x}", "account_uuid": "", "session_id": session}
        )
    }
    if target <= 10_000:
        # A first short turn: the user's message carries the rest of the size.
        missing = target - len(json.dumps(b, separators=(",", ":")))
        b["messages"][0]["content"] = text(rng, max(0, missing))
        return json.dumps(b, separators=(",", ":"))
    i = 0
    while len(json.dumps(b, separators=(",", ":"))) < target:
        turns = turn(rng, i)
        # Keep the conversation ending on a user turn, before `metadata` (the last member).
        b["messages"][-1:-1] = turns if i else []
        if not i:
            b["messages"] = turns + b["messages"]
        i += 1
    return json.dumps(b, separators=(",", ":"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7860)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, target in SIZES.items():
        for stream in (False, True):
            rng = random.Random(f"{args.seed}-{name}")
            data = body(rng, target, stream)
            path = os.path.join(args.out, f"{name}{'-stream' if stream else ''}.json")
            with open(path, "w") as f:
                f.write(data)
            print(f"{path} {len(data)}")


if __name__ == "__main__":
    main()

"""A `pill serve` server under load: the questions of a conversation JSONL with choices (e.g.
`benchmarks/demo_eval_data.py`'s, the demo's 300 held-out digits) sent as chat completions through the `openai`
client, each picture as a PNG data URI, from 1 client (one request after another) and from N concurrent clients.
Reports, per client count: wall time, questions/s, latency median and 95th percentile, accuracy, and whether
every answer equals the 1-client answer (and, with --reference, the answer of a `pill eval --output` JSON of the
same questions). Greedy (temperature 0), at most 24 new tokens (the demo's evaluation).

    pill serve --adapter DEMO_RUN/phase2/adapter --base BASE_DIR --port 8000 &
    python benchmarks/vllm_server_load.py --url http://127.0.0.1:8000/v1 --model adapter \\
        --questions /tmp/demo-eval/questions.jsonl --clients 1 32 --reference /tmp/demo-eval/transformers.json
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_NEW_TOKENS = 24


def load_questions(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    for row in rows:
        png = (path.parent / row["image"]).read_bytes()
        row["uri"] = "data:image/png;base64," + base64.b64encode(png).decode()
        # the picture goes as an image_url part; vLLM writes its "<image>" before the text, as the data has it
        row["question"] = row["messages"][0]["content"].replace("<image>\n", "", 1)
    return rows


def run(url: str, model: str, questions: list[dict], clients: int) -> dict:
    from openai import OpenAI

    from pill.evaluate import parse_answer

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def ask(row):
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, temperature=0.0, max_tokens=MAX_NEW_TOKENS,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": row["uri"]}},
                                                   {"type": "text", "text": row["question"]}]}])
        return reply.choices[0].message.content, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, questions))
    wall = time.perf_counter() - started
    answers = [text for text, _ in results]
    latencies = sorted(latency for _, latency in results)
    correct = sum(parse_answer(text, row["choices"]) == row["answer"] for text, row in zip(answers, questions))
    return {"clients": clients, "wall_s": wall, "questions_per_s": len(questions) / wall,
            "latency_median_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "accuracy": correct / len(questions), "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--questions", required=True, type=Path)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--reference", type=Path, default=None, help="a `pill eval --output` JSON of the questions")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    questions = load_questions(args.questions, args.limit)
    reference = None
    if args.reference:
        reference = [p["output"] for p in json.loads(args.reference.read_text())["predictions"]][:len(questions)]
    runs = [run(args.url, args.model, questions, n) for n in args.clients]
    for r in runs:
        r["same_as_first_run"] = sum(a == b for a, b in zip(r["answers"], runs[0]["answers"]))
        if reference is not None:
            r["same_as_reference"] = sum(a.strip() == b.strip() for a, b in zip(r["answers"], reference))
        print(f"{r['clients']:>3} client(s): {len(questions)} questions in {r['wall_s']:.1f} s "
              f"({r['questions_per_s']:.2f} q/s), latency median {r['latency_median_s']:.2f} s, p95 "
              f"{r['latency_p95_s']:.2f} s, accuracy {100 * r['accuracy']:.1f}%, answers equal to the first run's "
              f"{r['same_as_first_run']}/{len(questions)}"
              + (f", to --reference {r['same_as_reference']}/{len(questions)}" if reference is not None else ""))
    if args.json:
        args.json.write_text(json.dumps({"questions": len(questions), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

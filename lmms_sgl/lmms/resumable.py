"""``--use_cache PATH`` that survives an interrupted run, for the SGL models.

lmms-eval 0.7.3's response cache (``lmms_eval.caching.response_cache.ResponseCache``) has two gaps
for long runs, both closed here by wrapping ``ResponseCache.execute`` for SGL models only:

* it hands the model *all* uncached requests of a type in one call and stores the answers after that
  call returns, so a run killed midway has stored nothing. We call it batch by batch (``batch_size``
  requests), so each batch's answers are stored (SQLite + fsync'd audit log) as soon as they exist;
* a killed run never marks its run folder ready, and a restarted run gets a new run folder, so its
  answers would not be found. On its first call the wrapper copies the answers of interrupted runs
  (their audit logs under ``PATH/runs/*``) into the current run's database; they are then cache hits.

The cache stores only answer texts. Our per-sample records go to ``PATH/sgl_records.rank<r>.jsonl``
under the same cache key; a cache hit gets its record back (``extra["from_cache"] = True``), so the
run statistics cover every sample. A hit without a record (an answer cached by a run killed between
storing the answer and its record, or by another model) is counted in ``uncovered`` and reported.
Relies on ``ResponseCache``'s cache-key inputs and table layout of lmms-eval 0.7.3 (pinned).
"""

from __future__ import annotations

import json
import os
from glob import glob

from lmms_eval.api.instance import GenerationResult, Instance
from loguru import logger

_ORIGINAL = "_sgl_original_execute"


def cache_key(cache, reqtype: str, request: Instance) -> str:
    """The key ``ResponseCache.execute`` stores ``request``'s answer under."""
    from lmms_eval.caching import response_cache as rc

    return rc.compute_cache_key(
        request_type=reqtype,
        task_name=request.task_name,
        doc_id=request.doc_id,
        gen_kwargs=rc.extract_gen_kwargs(request),
        idx=request.idx,
        content_hash=rc._extract_content_hash(request),
        task_fingerprint=cache._task_fingerprints.get(request.task_name, ""),
        model_fingerprint_hash=cache._model_fingerprint_hash,
        eval_version=cache._eval_version,
    )


def adopt_interrupted_runs(cache) -> int:
    """Copy the answers of interrupted runs (run folders never merged) into ``cache``'s database."""
    root = getattr(cache, "_cache_root", None)
    if not root:
        return 0
    adopted = 0
    for audit in sorted(glob(os.path.join(root, "runs", "*", "rank_*.audit.jsonl"))):
        folder = os.path.dirname(audit)
        if os.path.abspath(folder) == os.path.abspath(cache._run_dir or ""):
            continue
        if os.path.exists(os.path.join(folder, ".merged")):
            continue
        with open(audit, encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if not entry.get("deterministic", True) or not entry.get("cache_key"):
                    continue
                if (
                    entry.get("request_type") == "generate_until"
                    and not str(entry.get("response", "")).strip()
                ):
                    continue  # lmms-eval does not cache empty answers (failed samples): run them again
                cursor = cache.db.execute(
                    "INSERT OR IGNORE INTO responses (cache_key, request_type, task_name, doc_id, idx, "
                    "gen_kwargs, response, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry["cache_key"],
                        entry["request_type"],
                        entry["task_name"],
                        entry["doc_id"],
                        entry.get("idx", 0),
                        entry.get("gen_kwargs", "{}"),
                        entry["response"],
                        entry.get("created_at", 0.0),
                    ),
                )
                adopted += cursor.rowcount
    cache.db.commit()
    if adopted:
        logger.info(f"--use_cache: resumed {adopted} answers of interrupted runs under {root}")
    return adopted


class RecordStore:
    """Our per-sample records beside the response cache, keyed like its answers."""

    def __init__(self, root: str, rank: int):
        self.path = os.path.join(root, f"sgl_records.rank{rank}.jsonl")
        self.records: dict[str, dict] = {}
        for path in sorted(glob(os.path.join(root, "sgl_records.rank*.jsonl"))):
            with open(path, encoding="utf-8") as lines:
                for line in lines:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.records[entry["key"]] = entry["record"]

    def add(self, entries: list[tuple[str, dict]]) -> None:
        if not entries:
            return
        with open(self.path, "a", encoding="utf-8") as out:
            for key, record in entries:
                out.write(json.dumps({"key": key, "record": record}, default=str) + "\n")
                self.records[key] = record
            out.flush()
            os.fsync(out.fileno())


class _PlainScores:
    """The model as the cache expects it: log-likelihood answers as bare ``(loss, greedy)`` pairs
    (lmms-eval 0.7.3's cache cannot validate a ``GenerationResult`` holding a pair); the wrapped
    results are kept by identity so the caller gets them back with their records."""

    def __init__(self, lm):
        self.lm = lm
        self.wrapped: dict[int, GenerationResult] = {}

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def loglikelihood(self, requests: list[Instance]) -> list:
        plain = []
        for result in self.lm.loglikelihood(requests):
            pair = tuple(result.text)
            self.wrapped[id(pair)] = result
            plain.append(pair)
        return plain


def resumable_execute(cache, lm, reqtype: str, requests: list[Instance]) -> list:
    original = getattr(type(cache), _ORIGINAL)
    if not getattr(lm, "sgl_resumable", False):
        return original(cache, lm, reqtype, requests)
    if not getattr(cache, "_sgl_adopted", False):
        adopt_interrupted_runs(cache)
        cache._sgl_adopted = True
        cache._sgl_records = RecordStore(cache._cache_root, cache._global_rank)
    store: RecordStore = cache._sgl_records
    results = []
    step = max(1, lm.batch_size)
    for start in range(0, len(requests), step):
        chunk = requests[start : start + step]
        proxy = _PlainScores(lm)
        answers = original(cache, proxy, reqtype, chunk)
        fresh = []
        for request, answer in zip(chunk, answers, strict=True):
            key = cache_key(cache, reqtype, request)
            answer = proxy.wrapped.get(id(answer), answer)
            if isinstance(answer, GenerationResult):  # answered now
                record = getattr(answer.token_counts, "sgl", None)
                if record is not None and not record.get("extra", {}).get("failed"):
                    fresh.append((key, record))
                results.append(answer)
            else:
                results.append(lm.from_cache(answer, store.records.get(key)))
        store.add(fresh)
    return results


def install() -> None:
    """Wrap ``ResponseCache.execute`` once (it stays lmms-eval's own for other models)."""
    from lmms_eval.caching.response_cache import ResponseCache

    if hasattr(ResponseCache, _ORIGINAL):
        return
    setattr(ResponseCache, _ORIGINAL, ResponseCache.execute)
    ResponseCache.execute = resumable_execute

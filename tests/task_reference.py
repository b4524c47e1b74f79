"""An independent computation of llama-perplexity's task scorers, for tests/test_tasks.py.

Written from the pinned tools/perplexity/perplexity.cpp, sharing nothing with apex_orch's task
code but the bindings' C API: the candidates are tokenized, packed into batches and decoded as the
tool packs them (the shared prefix once, for every candidate's sequence id; the tasks of one batch
while they fit; a unified KV cache of n_parallel x ctx cells), each candidate's log-probabilities
are summed in float64 and normalised as the tool does (the mean over the candidate's own tokens;
Winogrande's rules for which tokens count, its use of the first candidate's last logits for the
second candidate's first token when the option is not skipped, included), and the tasks the tool
scores, in its order, are drawn with the same generators:

- HellaSwag: std::mt19937 seeded 1 and libstdc++'s std::uniform_int_distribution<size_t>
  (GCC >= 11: Lemire's nearly-divisionless method on one 32-bit draw), always;
- Winogrande and multiple choice, when fewer tasks than the file holds are asked for: the same
  mt19937, j = int(float(2^-32) * float(draw) * float(remaining)) in float32, swap-remove.

Why the batches are the tool's and not one sequence per decode: in a MoE, a token's experts are
chosen by a top-k over router scores, and the batch a token is decoded in changes those scores in
their last bits; a near tie then flips an expert. Measured on the smoke reference model: one
Winogrande candidate's score moved by 1.1e-3 between the tool's packed batch and the task decoded
alone (the rest by ~1e-5), enough to flip that task's answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apex_orch.evaluation.session import BindingsModel


class MT19937:
    """std::mt19937 (32-bit Mersenne Twister, init_genrand seeding)."""

    def __init__(self, seed: int):
        self.mt = [0] * 624
        self.mt[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):
            self.mt[i] = (1812433253 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
        self.i = 624

    def __call__(self) -> int:
        if self.i >= 624:
            for k in range(624):
                y = (self.mt[k] & 0x80000000) | (self.mt[(k + 1) % 624] & 0x7FFFFFFF)
                self.mt[k] = self.mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.i = 0
        y = self.mt[self.i]
        self.i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)


def uniform_below(rng: MT19937, n: int) -> int:
    """libstdc++ uniform_int_distribution(0, n-1) on a 32-bit engine: Lemire's method."""
    product = rng() * n
    low = product & 0xFFFFFFFF
    if low < n:
        threshold = (-n % (1 << 32)) % n
        while low < threshold:
            product = rng() * n
            low = product & 0xFFFFFFFF
    return product >> 32


def hellaswag_order(n_available: int, n_tasks: int) -> list[int]:
    """File indices of the tasks --hellaswag scores, in the order it scores them."""
    rng, left, out = MT19937(1), list(range(n_available)), []
    for _ in range(n_tasks):
        out.append(left.pop(uniform_below(rng, len(left))))
    return out


def subset_order(n_available: int, n_tasks: int) -> list[int]:
    """File indices --winogrande / --multiple-choice score when asked for n_tasks < n_available."""
    if n_tasks >= n_available:
        return list(range(n_available))
    rng, aux, out = MT19937(1), list(range(n_available)), []
    scale = np.float32(1.0) / (np.float32(1.0) + np.float32(4294967295.0))
    for _ in range(n_tasks):
        j = int(scale * np.float32(rng()) * np.float32(len(aux)))
        out.append(aux[j])
        aux[j] = aux[-1]
        aux.pop()
    return out


@dataclass
class Choice:
    scores: list[float]
    chosen: int          # 0-based index of the highest score (the first on a tie)
    skip: bool | None = None    # Winogrande: the option's own tokens were left out of the scores

    @property
    def margin(self) -> float:
        rest = sorted(self.scores, reverse=True)
        return rest[0] - rest[1]


@dataclass
class _Packed:
    seqs: list[list[int]]       # the candidates' tokens (BOS first)
    cp: int                     # tokens all candidates share
    logits_all: bool            # Winogrande asks for logits at every own token, the others not at the last
    rows: dict = None           # (candidate, position) -> log-softmax after that position

    @property
    def required(self) -> int:
        return self.cp + sum(len(s) - self.cp for s in self.seqs)


def _common_prefix(seqs: list[list[int]]) -> int:
    cp = 0
    while cp < min(map(len, seqs)) and len({s[cp] for s in seqs}) == 1:
        cp += 1
    return cp


class ReferenceScorer:
    """Candidate scores of one model through the bindings, decoded in the batches the tool packs."""

    def __init__(self, model_path, *, n_ctx: int, n_parallel: int, n_batch: int = 2048, n_ubatch: int = 512,
                 threads: int = 2):
        self.bm = BindingsModel(model_path)
        ll = self.ll = self.bm.ll
        self.n_parallel, self.n_ctx = n_parallel, n_parallel * n_ctx
        self.n_batch = min(n_batch, self.n_ctx)
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = self.n_ctx, self.n_batch, n_ubatch
        cp.n_seq_max, cp.kv_unified, cp.swa_full = n_parallel, True, False
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = ll.llama_init_from_model(self.bm.model, cp)
        assert self.ctx, "llama.cpp could not create the reference context"
        self.batch = ll.llama_batch_init(self.n_batch, 0, n_parallel)

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.bm.close()

    def tokens(self, text: str) -> list[int]:
        return [int(t) for t in self.bm.tokenize(text.encode("utf-8"))]

    def _decode(self, entries: list[tuple[int, int, list[int], bool]]) -> np.ndarray:
        """Decode (token, pos, seq ids, output) entries in sub-batches of n_batch, as decode_helper
        does; the float64 log-softmax of every output row, in batch order."""
        ll, b, out = self.ll, self.batch, []
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        for lo in range(0, len(entries), self.n_batch):
            part = entries[lo:lo + self.n_batch]
            for i, (tok, pos, seq_ids, want) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(seq_ids), int(want)
                for k, sid in enumerate(seq_ids):
                    b.seq_id[i][k] = sid
            b.n_tokens = len(part)
            assert ll.llama_decode(self.ctx, b) == 0, "llama_decode failed"
            n_out = sum(1 for e in part if e[3])
            logits = np.ctypeslib.as_array(ll.llama_get_logits(self.ctx), shape=(n_out, self.bm.n_vocab))
            out.append(logits.astype(np.float64))
        rows = np.concatenate(out)
        shifted = rows - rows.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def _run(self, tasks: list[_Packed], seqs_per_task, max_seq: int) -> None:
        """The tool's packing: tasks in order, while their tokens fit the context and their
        sequences the first max_seq ids; the shared prefix once (logits at its last token), then
        each candidate's own tokens."""
        i0 = 0
        while i0 < len(tasks):
            entries, n_cur, i1, s0, where = [], 0, i0, 0, []
            while i1 < len(tasks) and n_cur + tasks[i1].required <= self.n_ctx:
                t = tasks[i1]
                if s0 + seqs_per_task(t) > max_seq:
                    break
                ids = list(range(s0, s0 + len(t.seqs)))
                marks = []
                for p in range(t.cp):
                    entries.append((t.seqs[0][p], p, ids, p == t.cp - 1))
                marks.append(("prefix", t.cp - 1))
                for k, s in enumerate(t.seqs):
                    for p in range(t.cp, len(s)):
                        want = t.logits_all or p < len(s) - 1
                        entries.append((s[p], p, [s0 + k], want))
                        if want:
                            marks.append((k, p))
                where.append((t, marks))
                s0 += seqs_per_task(t)
                n_cur += t.required
                i1 += 1
            assert i1 > i0, "a task does not fit in the context"
            rows = self._decode(entries)
            r = 0
            for t, marks in where:
                t.rows = {}
                for mark in marks:
                    if mark[0] == "prefix":
                        for k in range(len(t.seqs)):
                            t.rows[(k, mark[1])] = rows[r]
                    else:
                        t.rows[mark] = rows[r]
                    r += 1
            i0 = i1

    @staticmethod
    def _mean_endings(t: _Packed) -> Choice:
        """HellaSwag / multiple choice: each candidate's mean log-prob over its own tokens (the
        first predicted from the shared prefix's last token)."""
        scores = []
        for k, s in enumerate(t.seqs):
            terms = [t.rows[(k, j)][s[j + 1]] for j in range(t.cp - 1, len(s) - 1)]
            scores.append(sum(terms) / len(terms))
        return Choice(scores, int(np.argmax(scores)))

    def hellaswag(self, tasks) -> list[Choice]:
        packed = []
        for task in tasks:
            seqs = [self.tokens(task.context + " " + e) for e in task.endings]
            packed.append(_Packed(seqs, _common_prefix(seqs), False))
        self._run(packed, lambda t: 4, min(4 * 32, self.n_parallel))
        return [self._mean_endings(t) for t in packed]

    def multiple_choice(self, tasks) -> list[Choice]:
        packed = []
        for task in tasks:
            seqs = [self.tokens(task.question + " " + a) for a in task.answers]
            packed.append(_Packed(seqs, _common_prefix(seqs), False))
        self._run(packed, lambda t: len(t.seqs), min(4 * 32, self.n_parallel))
        return [self._mean_endings(t) for t in packed]

    def winogrande(self, tasks) -> list[Choice]:
        packed, bases = [], []
        for task in tasks:
            first, second = task.parts
            seqs = [self.tokens(first + c + second) for c in task.choices]
            packed.append(_Packed(seqs, _common_prefix(seqs), True))
            bases.append([len(self.tokens(first + c)) for c in task.choices])
        self._run(packed, lambda t: 2, min(2 * 128, self.n_parallel))
        out = []
        for t, n_bases in zip(packed, bases):
            skip = all(len(s) - t.cp > 3 for s in t.seqs)      # the option's own tokens are left out
            scores = []
            for k, s in enumerate(t.seqs):
                n_base = n_bases[k] if skip else t.cp
                assert n_base >= t.cp, "the option's tokens start inside the shared prefix: unsupported sample"
                last = 1 if len(s) - n_base > 1 else 0             # the final token is left out too
                terms = []
                for j in range(n_base - 1, len(s) - 1 - last):
                    row = t.rows[(k, j)]
                    if k == 1 and not skip and j == t.cp - 1:
                        row = t.rows[(0, len(t.seqs[0]) - 1)]      # the tool's index (its FIXME): after the
                    terms.append(row[s[j + 1]])                    # first candidate's last token
                scores.append(sum(terms) / (len(s) - n_base - last))
            out.append(Choice(scores, 0 if scores[0] > scores[1] else 1, skip))
        return out

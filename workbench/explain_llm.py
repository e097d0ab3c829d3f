"""Language models that explain features and judge explanations (for the scorers in ``workbench.explain_scoring``).

An LLM is named by a spec: ``hf:MODEL`` (a causal LM through transformers, used with its chat
template; ``hf:default`` and ``hf:smollm2-135m`` are the offline SmolLM2-135M-Instruct) or
``openai:URL`` (an OpenAI-compatible server: POST ``URL/v1/chat/completions``, model name from
``--llm-model``). Both offer ``complete`` (greedy text) and ``yes_probabilities``: for a local
model P(yes) is read from the next-token distribution after the prompt,
P(yes) = σ(logsumexp_{t∈Yes} ℓ_t − logsumexp_{t∈No} ℓ_t), with Yes/No the first tokens of
"Yes", " Yes", "yes", ... — nothing is generated; a server is asked for one token with its
``top_logprobs`` (or, without them, its answer counts as 1 or 0).

``LLMJudge`` turns a chat model into the ``Judge`` that ``workbench.explain_scoring``'s scorers ask;
``LLMExplainer`` writes a label from marked examples.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from workbench.errors import WorkbenchError, first_line
from workbench.explain_data import Shown

YES, NO = ("Yes", " Yes", "yes", " yes", "YES"), ("No", " No", "no", " no", "NO")
TIMEOUT_S = 5.0  # connecting to an OpenAI-compatible server
REPLY_TIMEOUT_S = 60.0
BATCH = 8  # prompts per forward pass of a local judge


class ExplainError(WorkbenchError):
    """A bad explainer, scorer or LLM spec, an unreachable server, or a model without a chat template."""


@dataclass(frozen=True)
class Question:
    kind: str  # 'detection' | 'fuzzing'
    explanation: str
    window: Shown


class ChatModel(Protocol):
    name: str

    def complete(self, messages: list[dict], max_new_tokens: int, prefix: str = "") -> str: ...

    def yes_probabilities(self, conversations: list[list[dict]]) -> list[float]: ...


# -- prompts -------------------------------------------------------------------------------------
EXPLAIN_SYSTEM = ("You describe what a feature of a language model responds to. In each text example the tokens where the "
                  "feature is active are marked like <<this>>. Say in a few words what the marked tokens have in common: "
                  "which words or symbols they are and what comes before them. Reply with the description only, under 12 words.")
DETECTION = ("A feature of a language model is described as: \"{explanation}\".\nText: {text}\n"
             "Is this feature active anywhere in the text? Answer Yes or No.")
FUZZING = ("A feature of a language model is described as: \"{explanation}\".\nIn this text some tokens are marked like <<this>>.\n"
           "Text: {text}\nDoes the description fit every marked token? Answer Yes or No.")


REPLY_START = "The marked tokens are"
JUDGE_SYSTEM = "You check explanations of language-model features. Answer Yes or No."


def question_messages(q: Question) -> list[dict]:
    template = DETECTION if q.kind == "detection" else FUZZING
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": template.format(explanation=q.explanation, text=q.window.text)}]


def explain_messages(examples: list[Shown]) -> list[dict]:
    lines = "\n".join(f"{i + 1}. {e.text}" for i, e in enumerate(examples))
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": f"Examples:\n{lines}\nDescription:"}]


def clean_label(text: str) -> str:
    """The reply's first sentence, without a 'Description:' prefix, numbering, marks or quotes."""
    line = " ".join(text.replace("<<", "").replace(">>", "").replace("↵", " ").split()).lstrip(":;,- ")
    for prefix in ("description:", "explanation:", "answer:"):
        if line.lower().startswith(prefix):
            line = line[len(prefix):].strip()
    line = re.sub(r"^\d+[.)]\s*", "", line)
    line = re.split(r"(?<=[a-z0-9\"'])\.\s|\s\d+[.)]\s", line)[0]
    return line.rstrip(".").strip("\"'` ").rstrip(".")[:200] or "unclear"


class LLMJudge:
    """A judge backed by a chat model's P(yes)."""

    def __init__(self, llm: ChatModel):
        self.llm = llm

    def ask(self, questions: Sequence[Question]) -> list[float]:
        return self.llm.yes_probabilities([question_messages(q) for q in questions])


class LLMExplainer:
    """delphi's explainer: top and band examples with their active tokens marked; a short reply."""

    def __init__(self, llm: ChatModel, max_new_tokens: int = 24):
        self.llm, self.max_new_tokens = llm, max_new_tokens

    def explain(self, examples: list[Shown]) -> str:
        """The reply's first line; a local model's reply is started for it (``REPLY_START``), which keeps
        a small model from answering with a preamble."""
        return clean_label(self.llm.complete(explain_messages(examples), self.max_new_tokens, prefix=REPLY_START))


# -- LLM backends --------------------------------------------------------------------------------
class HFChat:
    """A local causal LM with a chat template (transformers, no TransformerLens)."""

    def __init__(self, model: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workbench.models import resolve_model_path

        alias = "smollm2-135m" if model == "default" else model
        self.name = f"hf:{alias}"
        try:
            path = resolve_model_path(alias)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ExplainError(f"cannot load the tokenizer of hf:{model} offline: {first_line(err)}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise ExplainError(f"hf:{model} has no chat template; choose an instruction-tuned model (e.g. hf:smollm2-135m)")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device).eval()
        self.device = device
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.yes = sorted({self.tokenizer.encode(w, add_special_tokens=False)[0] for w in YES})
        self.no = sorted({self.tokenizer.encode(w, add_special_tokens=False)[0] for w in NO})

    def _encode(self, conversations: list[list[dict]], prefix: str = ""):
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) + prefix for c in conversations]
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def complete(self, messages: list[dict], max_new_tokens: int, prefix: str = "") -> str:
        """Greedy reply; ``prefix`` starts the assistant's turn and is not part of the result."""
        import torch

        batch = self._encode([messages], prefix)
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def yes_probabilities(self, conversations: list[list[dict]]) -> list[float]:
        import torch

        out = []
        for start in range(0, len(conversations), BATCH):
            batch = self._encode(conversations[start:start + BATCH])
            with torch.no_grad():
                # left padding: the last position predicts the answer; only its logits are computed
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            margin = torch.logsumexp(logp[:, self.yes], -1) - torch.logsumexp(logp[:, self.no], -1)
            out += torch.sigmoid(margin).tolist()
        return out


class OpenAIChat:
    """An OpenAI-compatible chat endpoint over urllib."""

    def __init__(self, url: str, model: str | None):
        if not url.startswith(("http://", "https://")):
            raise ExplainError(f"openai:URL needs an http:// or https:// URL, got '{url}'")
        self.url, self.model = url.rstrip("/"), model or "default"
        self.name = f"openai:{self.url}" + (f"#{model}" if model else "")
        try:  # any HTTP answer means a server is there; only a failed connection is refused
            urllib.request.urlopen(f"{self.url}/v1/models", timeout=TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass
        except (urllib.error.URLError, socket.timeout, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise ExplainError(f"cannot reach {self.url} ({first_line(reason)}); start the server or fix the URL") from None

    def _post(self, messages: list[dict], **extra) -> dict:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0, **extra}).encode()
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REPLY_TIMEOUT_S) as reply:
                return json.loads(reply.read())
        except (urllib.error.URLError, socket.timeout, OSError, ValueError) as err:
            raise ExplainError(f"{self.url}/v1/chat/completions failed: {first_line(getattr(err, 'reason', err))}") from None

    def complete(self, messages: list[dict], max_new_tokens: int, prefix: str = "") -> str:
        """Greedy reply (a server's turn cannot be started for it, so ``prefix`` is not used)."""
        return self._post(messages, max_tokens=max_new_tokens)["choices"][0]["message"]["content"] or ""

    def yes_probabilities(self, conversations: list[list[dict]]) -> list[float]:
        out = []
        for messages in conversations:
            choice = self._post(messages, max_tokens=1, logprobs=True, top_logprobs=10)["choices"][0]
            top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
            yes = sum(np.exp(t["logprob"]) for t in top if t["token"] in YES)
            no = sum(np.exp(t["logprob"]) for t in top if t["token"] in NO)
            if yes + no > 0:
                out.append(float(yes / (yes + no)))
            else:
                text = (choice["message"].get("content") or "").strip().lower()
                out.append(1.0 if text.startswith("yes") else 0.0 if text.startswith("no") else 0.5)
        return out


def parse_llm_spec(spec: str) -> tuple[str, str]:
    """('hf' | 'openai', rest) of an LLM spec, checked for form only."""
    kind, sep, rest = spec.partition(":")
    if kind not in ("hf", "openai") or not sep or not rest:
        raise ExplainError(f"unknown explainer '{spec}': use pattern, hf:MODEL (hf:default is SmolLM2-135M-Instruct) or openai:URL")
    return kind, rest


def canonical_llm(spec: str, llm_model: str | None = None) -> str:
    """The name a spec's rows are stored under (``hf:default`` is ``hf:smollm2-135m``)."""
    kind, rest = parse_llm_spec(spec)
    if kind == "hf":
        return f"hf:{'smollm2-135m' if rest == 'default' else rest}"
    return f"openai:{rest.rstrip('/')}" + (f"#{llm_model}" if llm_model else "")


def open_llm(spec: str, *, llm_model: str | None = None, device: str = "cpu") -> ChatModel:
    kind, rest = parse_llm_spec(spec)
    return HFChat(rest, device=device) if kind == "hf" else OpenAIChat(rest, llm_model)

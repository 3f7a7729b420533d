"""Text formats shared by every stage, so SFT, PPO and evaluation see prompts the same way."""

from __future__ import annotations

import re

# The prompt ends at "Answer:" and every response starts with a space. With byte-level BPE, " The" is one
# token, so a prompt ending in "Answer: " would end on a lone-space token the model never saw in training.
ANSWER_MARKER = "\n\nAnswer:"


def prompt(question: str) -> str:
    """The seed's prompt, `Question: …\\n\\nAnswer:`; the response (with its leading space) follows."""
    return f"Question: {question.strip()}{ANSWER_MARKER}"


def sft_text(row: dict) -> str:
    """An OpenOrca row as the seed's `Question: …\\n\\nAnswer: …`. The seed ignored system_prompt; so do we."""
    return prompt(row["question"]) + " " + row["response"].strip()


def rl_prompt(row: dict) -> str:
    """An Alpaca-OrcaChat row as a policy prompt (instruction, then input when there is one)."""
    question = row["instruction"].strip()
    if row.get("input", "").strip():
        question = f"{question}\n{row['input'].strip()}"
    return prompt(question)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_to_qa(text: str) -> str:
    """Turn an hh-rlhf transcript into the policy's `Question/Answer` layout (used when scoring)."""
    return _HH_TURN.sub(lambda m: "Question: " if m.group(1) == "Human" else ANSWER_MARKER + " ", text).strip()


def reward_text(prompt_text: str, response: str) -> str:
    """What the reward model scores: the decoded query + response, as in the seed."""
    return prompt_text + response

"""Text formats shared by every stage, so SFT, PPO and evaluation see prompts the same way.

Two prompt formats (`data.prompt_format`): `qa`, the seed's `Question: …\n\nAnswer: …`, and `plain`, where a
prompt is its text as it is and the response continues it (a story opening and its continuation): for a pretrained
model that was never taught the seed's template.
"""

from __future__ import annotations

import re

# The prompt ends at "Answer:" and every response starts with a space. With byte-level BPE, " The" is one
# token, so a prompt ending in "Answer: " would end on a lone-space token the model never saw in training.
ANSWER_MARKER = "\n\nAnswer:"


QA, PLAIN = "qa", "plain"


def prompt(question: str, fmt: str = QA) -> str:
    """The seed's prompt, `Question: …\\n\\nAnswer:` (or, `plain`, the text itself); the response (with its
    leading space) follows."""
    return question.strip() if fmt == PLAIN else f"Question: {question.strip()}{ANSWER_MARKER}"


def sft_text(row: dict, fmt: str = QA) -> str:
    """An OpenOrca row as the seed's `Question: …\\n\\nAnswer: …` (or, `plain`, the question continued by the
    response). The seed ignored system_prompt; so do we."""
    return (prompt(row["question"], fmt) + " " + row["response"].strip()).strip()


def rl_question(row: dict) -> str:
    """An Alpaca-OrcaChat row's question: the instruction, then the input when there is one."""
    question = row["instruction"].strip()
    if (row.get("input") or "").strip():
        question = f"{question}\n{row['input'].strip()}"
    return question


def rl_prompt(row: dict, fmt: str = QA) -> str:
    """An Alpaca-OrcaChat row as a policy prompt."""
    return prompt(rl_question(row), fmt)


def split_prompt_completion(text: str) -> tuple[str, str] | None:
    """`Question: …\n\nAnswer: …` -> (prompt ending at the last `Answer:`, completion with its leading space)."""
    head, marker, tail = text.rpartition(ANSWER_MARKER)
    if not marker:
        return None
    return head + marker, " " + tail.strip()


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_to_qa(text: str) -> str:
    """Turn an hh-rlhf transcript into the policy's `Question/Answer` layout (used when scoring)."""
    # A Human turn after an Assistant turn starts on its own paragraph, as in the transcript.
    return _HH_TURN.sub(lambda m: "\n\nQuestion: " if m.group(1) == "Human" else ANSWER_MARKER + " ", text).strip()


def preference_pair(transcript: str, fmt: str = QA) -> tuple[str, str] | None:
    """An hh-rlhf transcript as (prompt, completion) in the run's prompt format: the completion is the last
    Assistant turn (with its leading space), the prompt everything before it — `qa`: in the `Question/Answer`
    layout, ending at the last `Answer:`; `plain`: the turns' text without their markers, a paragraph each. None when
    the transcript has no Assistant turn to complete."""
    if fmt != PLAIN:
        return split_prompt_completion(hh_to_qa(transcript))
    head, marker, tail = transcript.rpartition("\n\nAssistant: ")
    if not marker:
        return None
    return _HH_TURN.sub("\n\n", head).strip(), " " + tail.strip()


def preference_text(transcript: str, fmt: str = QA) -> str:
    """A whole hh-rlhf transcript as the reward model scores it: the prompt and its completion, in the run's format."""
    if fmt != PLAIN:
        return hh_to_qa(transcript)
    pair = preference_pair(transcript, fmt)
    return _HH_TURN.sub("\n\n", transcript).strip() if pair is None else pair[0] + pair[1]


def reward_text(prompt_text: str, response: str) -> str:
    """What the reward model scores: the decoded query + response, as in the seed."""
    return prompt_text + response

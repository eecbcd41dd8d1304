"""LongBench (v1) from the official JSON-lines files in a local directory.

Download the data yourself (``data.zip`` of THUDM/LongBench on the Hugging Face
hub) and pass the folder holding ``<dataset>.jsonl`` (LongBench-E:
``<dataset>_e.jsonl``). Each record has ``input``, ``context``, ``answers``,
``all_classes``, ``length`` and ``_id``.

Prompts, generation budgets, metrics and post-processing are LongBench's
(``config/dataset2prompt.json``, ``dataset2maxlen.json``, ``eval.py``): the
prompt is truncated in the middle to fit the limit, the chat template is applied
except for the few-shot and code tasks (trec, triviaqa, samsum, lsht, lcc,
repobench-p), and for trec, triviaqa, samsum and lsht only the first line of the
answer is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompts import Sample, read_task_records, truncated_sample


@dataclass(frozen=True)
class LongBenchTask:
    prompt: str
    max_new_tokens: int
    metric: str
    chat: bool = True
    first_line: bool = False


_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)

TASKS: dict[str, LongBenchTask] = {
    "narrativeqa": LongBenchTask(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "qasper": LongBenchTask(
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
        'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
        128,
        "qa_f1",
    ),
    "multifieldqa_en": LongBenchTask(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        "qa_f1",
    ),
    "multifieldqa_zh": LongBenchTask(
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
        64,
        "qa_f1_zh",
    ),
    "hotpotqa": LongBenchTask(_QA_PASSAGES, 32, "qa_f1"),
    "2wikimqa": LongBenchTask(_QA_PASSAGES, 32, "qa_f1"),
    "musique": LongBenchTask(_QA_PASSAGES, 32, "qa_f1"),
    "dureader": LongBenchTask(
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：", 128, "rouge_l_zh"
    ),
    "gov_report": LongBenchTask(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "qmsum": LongBenchTask(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge_l",
    ),
    "multi_news": LongBenchTask(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "vcsum": LongBenchTask("下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：", 512, "rouge_l_zh"),
    "trec": LongBenchTask(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        "classification",
        chat=False,
        first_line=True,
    ),
    "triviaqa": LongBenchTask(
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32,
        "qa_f1",
        chat=False,
        first_line=True,
    ),
    "samsum": LongBenchTask(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        "rouge_l",
        chat=False,
        first_line=True,
    ),
    "lsht": LongBenchTask("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, "classification", chat=False, first_line=True),
    "passage_count": LongBenchTask(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32,
        "count",
    ),
    "passage_retrieval_en": LongBenchTask(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: ",
        32,
        "retrieval",
    ),
    "passage_retrieval_zh": LongBenchTask(
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
        32,
        "retrieval_zh",
    ),
    "lcc": LongBenchTask("Please complete the code given below. \n{context}Next line of code:\n", 64, "edit_sim", chat=False),
    "repobench-p": LongBenchTask(
        "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "edit_sim", chat=False
    ),
}
ENGLISH = tuple(t for t in TASKS if not t.endswith("_zh") and t not in ("dureader", "vcsum", "lsht"))
DOWNLOAD_HINT = "the official LongBench data: unzip data.zip from the THUDM/LongBench dataset repository"


def data_file(data_dir: str | Path, task: str, *, e: bool = False) -> Path:
    return Path(data_dir) / f"{task}{'_e' if e else ''}.jsonl"


def build_samples(
    tokenizer: Any,
    data_dir: str | Path,
    tasks: list[str] | tuple[str, ...],
    *,
    limit: int,
    num_samples: int | None = None,
    longbench_e: bool = False,
    chat: bool = True,
) -> list[Sample]:
    """Samples of the given LongBench tasks, prompts middle-truncated so that prompt
    plus answer budget fit ``limit`` tokens (the model's context).

    Raises:
        FileNotFoundError: naming the expected ``<task>.jsonl`` when it is missing.
    """
    samples = []
    for task in tasks:
        path = data_file(data_dir, task, e=longbench_e)
        records = read_task_records("LongBench", task, TASKS, path, hint=DOWNLOAD_HINT, num_samples=num_samples)
        spec = TASKS[task]
        for index, record in enumerate(records):
            text = spec.prompt.format(context=record.get("context", ""), input=record.get("input", ""))
            options = {"all_classes": list(record.get("all_classes") or [])} if spec.metric == "classification" else {}
            samples.append(
                truncated_sample(
                    tokenizer,
                    task,
                    index,
                    text,
                    limit=limit,
                    max_new_tokens=spec.max_new_tokens,
                    chat=chat and spec.chat,
                    references=tuple(record["answers"]),
                    metric=spec.metric,
                    postprocess="first_line" if spec.first_line else "none",
                    metric_options=options,
                    info={"id": record.get("_id"), "source_length": record.get("length")},
                )
            )
    return samples

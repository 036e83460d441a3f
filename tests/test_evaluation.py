"""evaluation.py: benchmark layouts and prompts, answer extraction and scoring, and the CLI under torchrun checked
against transformers (log-likelihood of the option labels and greedy generation on the same tiny model)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from mindspeed_llm.checkpoint import cli
from mindspeed_llm.errors import UserError
from mindspeed_llm.evaluation import choice_tasks, gen_tasks, humaneval, more_tasks
from mindspeed_llm.evaluation.report import summarize
from tests.conftest import REPO, run_cli, run_torchrun

MMLU_ROWS = [["What is 2+2?", "3", "4", "5", "6", "B"], ["Sky colour?", "blue", "red", "green", "pink", "A"],
             ["Cats say?", "woof", "moo", "meow", "quack", "C"]]
ZH_ROWS = [["一加一等于几？", "一", "二", "三", "四", "B"], ["天空是什么颜色？", "蓝", "红", "绿", "黑", "A"],
           ["猫怎么叫？", "汪", "哞", "喵", "嘎", "C"]]
GSM8K_TEST = [{"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
              {"question": "A box holds 1,200 pens; 200 are sold. How many are left?",
               "answer": "1,200-200=<<1200-200=1000>>1000\n#### 1,000"}]
GSM8K_TRAIN = [{"question": "Ann has 2 cats and 3 dogs. How many pets?", "answer": "2+3=<<2+3=5>>5 pets\n#### 5"}]
BBH = {"examples": [{"input": "not ( True ) and ( True ) is", "target": "False"},
                    {"input": "True and not not ( not False ) is", "target": "True"}]}
BBH_COT = "BBH canary line\n-----\nQ: True and False is\nA: Let's think step by step. So the answer is False."
AGIEVAL = [{"passage": "P1. ", "question": "Pick one.", "options": ["(A)x", "(B)y", "(C)z", "(D)w"], "label": "C"},
           {"passage": None, "question": "Pick two.", "options": ["(A)x", "(B)y", "(C)z", "(D)w", "(E)v"],
            "label": "E"},
           {"passage": None, "question": "Many.", "options": ["(A)x", "(B)y"], "label": ["A", "B"]},
           {"passage": None, "question": "Cloze: 1+1=?", "options": None, "label": None, "answer": "2"}]
HELLASWAG = [{"ctx": "A man opens a door.", "endings": ["he walks in.", "it sings.", "it melts.", "he flies."],
              "label": 0, "activity_label": "Doors"},
             {"ctx": "A cat sits.", "endings": ["it barks.", "it purrs.", "it moos.", "it quacks."], "label": "1",
              "activity_label": "Cats"}]
HUMANEVAL = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
              "canonical_solution": "    return a + b\n", "entry_point": "add",
              "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
             {"task_id": "HumanEval/1", "prompt": "def neg(x):\n", "canonical_solution": "    return -x\n",
              "entry_point": "neg", "test": "def check(candidate):\n    assert candidate(2) == -2\n"}]
BOOLQ = [{"question": "is the sky blue", "passage": "The sky is blue on clear days.", "answer": True},
         {"question": "do fish fly", "passage": "Fish swim in water.", "answer": False},
         {"question": "is ice cold", "passage": "Ice is frozen water.", "answer": True}]


def _csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _jsonl(path: Path, objs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")


def build_tasks(root: Path) -> dict[str, Path]:
    """Tiny benchmark directories in each benchmark's public layout."""
    for sub in ("abstract_algebra", "anatomy"):
        _csv(root / "mmlu/test" / f"{sub}_test.csv", MMLU_ROWS)
        _csv(root / "mmlu/dev" / f"{sub}_dev.csv", MMLU_ROWS[:2])
    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _csv(root / "ceval/val/computer_network_val.csv", [[str(i)] + r + [""] for i, r in enumerate(ZH_ROWS)], head)
    _csv(root / "ceval/dev/computer_network_dev.csv", [[str(i)] + r + ["因为"] for i, r in enumerate(ZH_ROWS[:1])],
         head)
    (root / "ceval/subject_mapping.json").write_text(json.dumps(
        {"computer_network": ["Computer Network", "计算机网络", "STEM"]}, ensure_ascii=False), encoding="utf-8")
    cm_head = ["", "Question", "A", "B", "C", "D", "Answer"]
    _csv(root / "cmmlu/test/agronomy.csv", [[str(i)] + r for i, r in enumerate(ZH_ROWS)], cm_head)
    _csv(root / "cmmlu/dev/agronomy.csv", [[str(i)] + r for i, r in enumerate(ZH_ROWS[:1])], cm_head)
    _jsonl(root / "gsm8k/test.jsonl", GSM8K_TEST)
    _jsonl(root / "gsm8k/train.jsonl", GSM8K_TRAIN)
    _jsonl(root / "boolq/dev.jsonl", BOOLQ)
    (root / "bbh/bbh").mkdir(parents=True)
    (root / "bbh/bbh/boolean_expressions.json").write_text(json.dumps(BBH))
    (root / "bbh/cot-prompts").mkdir()
    (root / "bbh/cot-prompts/boolean_expressions.txt").write_text(BBH_COT)
    _jsonl(root / "agieval/v1/lsat-lr.jsonl", AGIEVAL)
    _jsonl(root / "agieval/v1/logiqa-zh.jsonl", AGIEVAL[:1])
    _jsonl(root / "hellaswag/hellaswag_val.jsonl", HELLASWAG)
    _jsonl(root / "human_eval/HumanEval.jsonl", HUMANEVAL)
    return {t: root / t for t in ("mmlu", "ceval", "cmmlu", "gsm8k", "boolq", "bbh", "agieval", "hellaswag",
                                  "human_eval")}


# ---- hand-written prompts: what each benchmark's own code builds ----------------------------------------------

MMLU_SHOTS = ("What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
              "Sky colour?\nA. blue\nB. red\nC. green\nD. pink\nAnswer: A\n\n")


def expected_prompts() -> dict[str, list[tuple[str, str, str]]]:
    """task -> [(subject, prompt, answer)] in file order."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    mmlu = []
    for sub, name in (("abstract_algebra", "abstract algebra"), ("anatomy", "anatomy")):
        head = f"The following are multiple choice questions (with answers) about {name}.\n\n" + MMLU_SHOTS
        for q, a, b, c, d, ans in MMLU_ROWS:
            mmlu.append((sub, f"{head}{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:", ans))
    out["mmlu"] = mmlu
    ce_head = "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n一加一等于几？\nA. 一\nB. 二\nC. 三\nD. 四\n答案：B\n\n"
    out["ceval"] = [("computer_network", f"{ce_head}{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案：", ans)
                    for q, a, b, c, d, ans in ZH_ROWS]
    cm_head = "以下是关于agronomy的单项选择题，请直接给出正确答案的选项。\n\n题目：一加一等于几？\nA. 一\nB. 二\nC. 三\nD. 四\n答案是：B\n\n"
    out["cmmlu"] = [("agronomy", f"{cm_head}题目：{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案是：", ans)
                    for q, a, b, c, d, ans in ZH_ROWS]
    out["boolq"] = [("boolq", "The sky is blue on clear days.\nQuestion: Is the sky blue?\nAnswer:", "Yes"),
                    ("boolq", "Fish swim in water.\nQuestion: Do fish fly?\nAnswer:", "No"),
                    ("boolq", "Ice is frozen water.\nQuestion: Is ice cold?\nAnswer:", "Yes")]
    shot = "Question: Ann has 2 cats and 3 dogs. How many pets?\nAnswer: 2+3=5 pets The answer is 5.\n\n"
    out["gsm8k"] = [("gsm8k", f"{shot}Question: {GSM8K_TEST[0]['question']}\nAnswer:", "7"),
                    ("gsm8k", f"{shot}Question: {GSM8K_TEST[1]['question']}\nAnswer:", "1000")]
    cot = "Q: True and False is\nA: Let's think step by step. So the answer is False.\n\n"
    out["bbh"] = [("boolean_expressions", f"{cot}Q: {ex['input']}\nA: Let's think step by step.", ex["target"])
                  for ex in BBH["examples"]]
    out["agieval"] = [
        ("logiqa-zh", "问题：P1. Pick one. 选项：(A)x (B)y (C)z (D)w\n答案：从A到D, 我们应选择", "C"),
        ("lsat-lr", "Q: P1. Pick one. Answer Choices: (A)x (B)y (C)z (D)w\nA: Among A through D, the answer is", "C"),
        ("lsat-lr", "Q: Pick two. Answer Choices: (A)x (B)y (C)z (D)w (E)v\nA: Among A through E, the answer is",
         "E")]
    out["hellaswag"] = [
        ("Doors", "A man opens a door.\nWhich ending is the most plausible?\nA. he walks in.\nB. it sings.\n"
                  "C. it melts.\nD. he flies.\nAnswer:", "A"),
        ("Cats", "A cat sits.\nWhich ending is the most plausible?\nA. it barks.\nB. it purrs.\nC. it moos.\n"
                 "D. it quacks.\nAnswer:", "B")]
    out["human_eval"] = [("human_eval", h["prompt"], "pass") for h in HUMANEVAL]
    return out


def test_loaders_build_the_benchmarks_prompts(tmp_path):
    paths = build_tasks(tmp_path)
    want = expected_prompts()
    loaded = {t: choice_tasks.LOADERS[t](paths[t], None) for t in ("mmlu", "ceval", "cmmlu")}
    loaded["boolq"] = gen_tasks.load_boolq(paths["boolq"], None, "en")
    loaded["gsm8k"] = gen_tasks.load_gsm8k(paths["gsm8k"], None, "en", cot=True)
    loaded["bbh"] = more_tasks.load_bbh(paths["bbh"], None, cot=True)
    loaded["agieval"], skipped = more_tasks.load_agieval(paths["agieval"], None)
    loaded["hellaswag"] = more_tasks.load_hellaswag(paths["hellaswag"], None)
    loaded["human_eval"] = humaneval.load_humaneval(paths["human_eval"], None)
    assert skipped == 2                                               # the multi-answer and the cloze item
    for task, items in loaded.items():
        assert [(i.subject, i.prompt, i.answer) for i in items] == want[task], task
    assert [i.labels for i in loaded["boolq"]] == [("Yes", "No")] * 3
    assert [len(i.labels) for i in loaded["agieval"]] == [4, 4, 5]
    assert more_tasks.load_bbh(paths["bbh"], 1, cot=False)[0].prompt == f"Q: {BBH['examples'][0]['input']}\nA:"
    assert len(choice_tasks.load_mmlu(paths["mmlu"], 2)) == 4          # --max-eval-samples per subject file
    zero = gen_tasks.load_gsm8k(paths["gsm8k"], None, "zh", cot=False)
    assert zero[0].prompt == f"问题：{GSM8K_TEST[0]['question']}\n答案："


def test_number_extraction():
    assert gen_tasks.gold_number("so 5+5=10\n#### 1,234", "x") == "1234"
    assert gen_tasks.last_number("We get 3 then 12.50, so the answer is 1,000.") == "1000"
    assert gen_tasks.last_number("it is -4.5 or 7.0") == "7"
    assert gen_tasks.last_number("no digits here") is None
    with pytest.raises(UserError, match=r"t.jsonl:3: the answer has no '#### <number>'"):
        gen_tasks.gold_number("42", "t.jsonl:3")


def test_bbh_answer_extraction():
    assert more_tasks.bbh_answer("x is True. So the answer is (B).\nQ: next", cot=True) == "(B)"
    assert more_tasks.bbh_answer("So the answer is valid", cot=True) == "valid"
    assert more_tasks.bbh_answer("  False.\nQ: more", cot=False) == "False"


def test_humaneval_runs_tests_in_a_subprocess_with_a_timeout():
    item = HUMANEVAL[0]
    assert humaneval.truncate("    return a + b\n\ndef other():\n    pass") == "    return a + b\n"
    assert humaneval.truncate("    return a\nprint(1)") == "    return a"
    run = lambda completion, timeout=10.0: humaneval.passes(item["prompt"], completion, item["test"],  # noqa: E731
                                                            item["entry_point"], timeout)
    assert run(item["canonical_solution"])
    assert not run("    return a - b\n")
    assert not run("    while True:\n        pass\n", timeout=2.0)
    assert not run("    return a + b\nimport sys\nsys.exit(0)\n")          # exits before the tests run
    # a completion that kills its interpreter only ends the subprocess
    assert not run("    import os\n    os._exit(0)\n")
    cases = [(h["prompt"], h["canonical_solution"], h["test"], h["entry_point"]) for h in HUMANEVAL]
    assert humaneval.passes_all(cases + [(item["prompt"], "    return 0\n", item["test"], "add")]) == \
        [True, True, False]


def test_bad_files_name_file_and_row(tmp_path):
    _csv(tmp_path / "m/x_test.csv", MMLU_ROWS[:1] + [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(UserError, match=r"x_test.csv:2: answer 'E' is not one of A, B, C, D"):
        choice_tasks.load_mmlu(tmp_path / "m", None)
    _csv(tmp_path / "n/y_test.csv", [["q", "a", "b"]])
    with pytest.raises(UserError, match=r"y_test.csv:1: expected 6 comma-separated fields, found 3"):
        choice_tasks.load_mmlu(tmp_path / "n", None)
    (tmp_path / "o").mkdir()
    with pytest.raises(UserError, match=r"no \*_test.csv files found \(--task mmlu\)"):
        choice_tasks.load_mmlu(tmp_path / "o", None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b/dev.jsonl").write_text('{"question": "q", "passage": "p", "answer": "yes"}\n')
    with pytest.raises(UserError, match=r'dev.jsonl:1: "answer" must be true or false'):
        gen_tasks.load_boolq(tmp_path / "b", None, "en")


def test_summary_counts_per_subject():
    recs = [{"subject": "a", "correct": True}, {"subject": "b", "correct": False}, {"subject": "a", "correct": False},
            {"subject": "a", "correct": True}]
    s = summarize("mmlu", recs)
    assert (s["correct"], s["total"]) == (2, 4) and s["accuracy"] == 0.5
    assert s["subjects"] == {"a": {"correct": 2, "total": 3, "accuracy": 2 / 3},
                             "b": {"correct": 0, "total": 1, "accuracy": 0.0}}


def test_label_variants_drop_a_shared_first_token():
    from mindspeed_llm.evaluation.scoring import label_variants

    class Tok:
        table = {"A": [1], " A": [9, 1], "B": [2], " B": [9, 2], "C": [9, 3], " C": [9, 3], "D": [4], " D": [8]}

        def encode(self, text, add_special_tokens=False):
            return self.table[text]

    assert label_variants(Tok(), ("A", "B", "D")) == [[1], [2], [4, 8]]
    with pytest.raises(UserError, match="option 'C' with the same token"):
        label_variants(Tok(), ("A", "C"))


def test_evaluation_parser_errors():
    from mindspeed_llm.evaluation.args import parse_args

    base = ["--load", "x", "--tokenizer-name-or-path", "y", "--task-data-path", "d"]
    with pytest.raises(UserError, match=r"--task needlebench: not implemented"):
        parse_args(base + ["--task", "needlebench"])
    with pytest.raises(UserError, match=r"--task-data-path has 2 paths for 3 tasks"):
        parse_args(base + ["d2", "--task", "mmlu", "ceval", "boolq"])
    with pytest.raises(UserError, match=r"--alternative-prompt: not supported"):
        parse_args(base + ["--task", "mmlu", "--alternative-prompt"])
    with pytest.raises(UserError, match=r"--results-file .*does not exist"):
        parse_args(base + ["--task", "mmlu", "--results-file", "/nonexistent/dir/r.json"])


# ---- the CLI under torchrun against transformers ----------------------------------------------------------------

def _convert(hf: Path, mg: Path, tp: int, pp: int) -> str:
    assert cli.main(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf), "--save-dir",
                     str(mg), "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size",
                     str(pp)]) == 0
    return str(mg)


MAX_NEW = 6


@pytest.fixture(scope="module")
def runs(tiny_qwen3, tmp_path_factory) -> dict:
    """Three launches: PP=2 on every task (plain prompts), TP=1 x DP=2 on MMLU with the chat template, and TP=2
    on MMLU and HellaSwag."""
    root = tmp_path_factory.mktemp("eval")
    paths = build_tasks(root / "data")
    tasks = ["mmlu", "ceval", "cmmlu", "gsm8k", "boolq", "bbh", "agieval", "hellaswag", "human_eval"]
    common = ["--tokenizer-name-or-path", str(tiny_qwen3), "--distributed-backend", "gloo", "--use-mcore-models",
              "--max-new-tokens", str(MAX_NEW), "--evaluation-batch-size", "2"]
    pp = run_torchrun("evaluation.py", *common, "--load", _convert(tiny_qwen3, root / "pp2", 1, 2),
                      "--pipeline-model-parallel-size", "2", "--task", *tasks, "--task-data-path",
                      *[str(paths[t]) for t in tasks], "--no-chat-template", "--chain-of-thought",
                      "--results-file", str(root / "pp2.json"), "--use-flash-attn")
    dp = run_torchrun("evaluation.py", *common, "--load", _convert(tiny_qwen3, root / "tp1", 1, 1),
                      "--task", "mmlu", "--task-data-path", str(paths["mmlu"]), "--max-eval-samples", "2",
                      "--evaluation-batch-size", "3", "--results-file", str(root / "dp2.json"))
    tp = run_torchrun("evaluation.py", *common, "--load", _convert(tiny_qwen3, root / "tp2", 2, 1),
                      "--tensor-model-parallel-size", "2", "--task", "mmlu", "hellaswag", "--task-data-path",
                      str(paths["mmlu"]), str(paths["hellaswag"]), "--no-chat-template", "--evaluation-batch-size",
                      "4", "--results-file", str(root / "tp2.json"))
    return {"pp": (pp, json.loads((root / "pp2.json").read_text())["tasks"]),
            "dp": (dp, json.loads((root / "dp2.json").read_text())["tasks"]),
            "tp": (tp, json.loads((root / "tp2.json").read_text())["tasks"])}


def _oracle_scores(hf: Path, prompts: list[list[int]], labels: tuple[str, ...]) -> list[list[float]]:
    """transformers: per label, log p(first token | prompt) of its spelling "L" or " L" (the likelier), one prompt at
    a time (no padding). A spelling whose first token another label's spelling shares (a vocabulary that splits " A"
    into " " + "A") tells nothing apart and is not scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    firsts = [[tok.encode(text, add_special_tokens=False)[0] for text in (lab, " " + lab)] for lab in labels]
    ids = [sorted({i for i in mine if all(i not in theirs for theirs in firsts[:n] + firsts[n + 1:])})
           for n, mine in enumerate(firsts)]
    assert all(ids)
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            logp = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), dim=-1)
            out.append([max(float(logp[i]) for i in label_ids) for label_ids in ids])
    return out


def _encode(hf: Path, texts: list[str], chat: bool) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    if chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                         tokenize=False) for t in texts]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def _check_choice_task(summary: dict, hf: Path, want: list[tuple[str, str, str]], chat: bool) -> None:
    items = summary["items"]
    prompts = _encode(hf, [p for _, p, _ in want], chat)
    ref = [_oracle_scores(hf, [p], tuple(i["scores"]))[0] for i, p in zip(items, prompts)]
    assert [(i["subject"], i["answer"], i["prompt_tokens"]) for i in items] == \
        [(s, a, len(p)) for (s, _, a), p in zip(want, prompts)]
    hand: dict[str, tuple[int, int]] = {}
    for item, row, (subject, _, answer) in zip(items, ref, want):
        labels = tuple(item["scores"])
        got = [item["scores"][lab] for lab in labels]
        assert torch.allclose(torch.tensor(got), torch.tensor(row), atol=1e-4), (item, row)
        pred = labels[max(range(len(labels)), key=lambda j: row[j])]
        assert item["prediction"] == pred and item["correct"] == (pred == item["answer"])
        c, n = hand.get(subject, (0, 0))
        hand[subject] = (c + (pred == answer), n + 1)
    assert {s: (v["correct"], v["total"]) for s, v in summary["subjects"].items()} == hand
    assert summary["correct"] == sum(c for c, _ in hand.values()) and summary["total"] == len(want)


@pytest.mark.distributed
@pytest.mark.parametrize("task", ["mmlu", "ceval", "cmmlu", "boolq", "agieval", "hellaswag"])
def test_choice_scores_match_transformers_at_pp2(runs, tiny_qwen3, task):
    _check_choice_task(runs["pp"][1][task], tiny_qwen3, expected_prompts()[task], chat=False)


@pytest.mark.distributed
@pytest.mark.parametrize("task", ["mmlu", "hellaswag"])
def test_choice_scores_match_transformers_at_tp2(runs, tiny_qwen3, task):
    _check_choice_task(runs["tp"][1][task], tiny_qwen3, expected_prompts()[task], chat=False)


@pytest.mark.distributed
def test_chat_template_and_data_parallel_split(runs, tiny_qwen3):
    proc, tasks = runs["dp"]
    want = [w for w in expected_prompts()["mmlu"] if not w[1].endswith(("Cats say?\nA. woof\nB. moo\nC. meow\nD. "
                                                                         "quack\nAnswer:"))]
    assert len(want) == 4                      # --max-eval-samples 2 per subject file
    _check_choice_task(tasks["mmlu"], tiny_qwen3, want, chat=True)


def _hf_greedy_texts(hf: Path, prompts: list[list[int]]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    eos = json.loads((hf / "generation_config.json").read_text())["eos_token_id"]
    with torch.no_grad():
        return [tok.decode(model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW,
                                          eos_token_id=eos)[0, len(p):], skip_special_tokens=True) for p in prompts]


@pytest.mark.distributed
@pytest.mark.parametrize("task", ["gsm8k", "bbh", "human_eval"])
def test_generation_tasks_match_transformers(runs, tiny_qwen3, task):
    summary = runs["pp"][1][task]
    want = expected_prompts()[task]
    prompts = _encode(tiny_qwen3, [p for _, p, _ in want], chat=False)
    items = summary["items"]
    assert [i["prompt_tokens"] for i in items] == [len(p) for p in prompts]
    assert [i["output"] for i in items] == _hf_greedy_texts(tiny_qwen3, prompts)
    assert [i["answer"] for i in items] == [a for _, _, a in want]
    for item in items:
        if task == "gsm8k":
            assert item["prediction"] == gen_tasks.last_number(item["output"])
        elif task == "bbh":
            assert item["prediction"] == more_tasks.bbh_answer(item["output"], cot=True)
        else:
            assert item["prediction"] == humaneval.truncate(item["output"])
            case = HUMANEVAL[item["index"]]
            ok = humaneval.passes(case["prompt"], item["prediction"], case["test"], case["entry_point"])
            assert item["correct"] == ok and item["task_id"] == case["task_id"]
            continue
        assert item["correct"] == (item["prediction"] == item["answer"])
    assert summary["correct"] == sum(i["correct"] for i in items)


@pytest.mark.distributed
def test_log_has_subject_lines_table_and_progress(runs):
    out = runs["pp"][0].stdout
    summary = runs["pp"][1]["mmlu"]
    s = summary["subjects"]["anatomy"]
    assert f"anatomy has {s['correct']} corrects in 3 questions, with accuracy {s['accuracy']}" in out
    assert f"mmlu acc = {summary['correct']}/6={summary['accuracy']}" in out
    assert re.search(r"^total\s+6\s+\d\.\d{4}$", out, re.M)
    assert re.search(r"mmlu: 6/6 items \(100%\), [\d.]+ items/s, ETA 0:00:00", out)
    assert "MMLU Running Time:" in out and "HUMAN_EVAL Running Time:" in out
    assert "agieval: 2 cloze or multi-answer questions left out" in out
    assert out.count("wrote evaluation results to") == 1
    assert "--use-flash-attn: accepted, no effect" in runs["pp"][0].stderr + out


def test_cli_bad_data_is_one_error_line(tiny_qwen3, tmp_path):
    mg = _convert(tiny_qwen3, tmp_path / "mg", 1, 1)
    _csv(tmp_path / "mmlu/bad_test.csv", [["q", "a", "b", "c", "d", "Z"]])
    proc = run_cli("evaluation.py", "--load", mg, "--tokenizer-name-or-path", str(tiny_qwen3), "--task", "mmlu",
                   "--task-data-path", str(tmp_path / "mmlu"), "--results-file", str(tmp_path / "r.json"),
                   "--distributed-backend", "gloo", check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert re.search(r"bad_test.csv:1: answer 'Z' is not one of A, B, C, D", errors[0])
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.json").exists()


# ---- MindSpeed-LLM's evaluate recipes ---------------------------------------------------------------------------

def _reference_flags(size: str) -> list[list[str]]:
    from tests.recipes import REFERENCE, split_flags

    m = re.search(rf"^## qwen3/evaluate_qwen3_{size}_ptd\n`torchrun evaluation.py` \(\d+ flags\)\n```\n(.*?)```",
                  REFERENCE.read_text(), re.M | re.S)
    flags = split_flags(m.group(1).split())
    return flags


@pytest.mark.parametrize("size, layers, tied, tp", [("0point6b", 28, True, 1), ("1point7b", 28, True, 1),
                                                    ("4b", 36, True, 1), ("8b", 36, False, 1),
                                                    ("14b", 40, False, 2), ("32b", 64, False, 8)])
def test_evaluate_recipes_pass_the_reference_flags(size, layers, tied, tp):
    import shlex

    from mindspeed_llm.evaluation.args import parse_args
    from mindspeed_llm.inference.model import resolve_model_config

    script = (REPO / f"examples/mcore/qwen3/evaluate_qwen3_{size}_ptd.sh").read_text()
    values = dict(re.findall(r"^(TP|PP|SEQ_LENGTH)=(\S+)$", script, re.M))
    body = script.split("$DISTRIBUTED_ARGS evaluation.py", 1)[1].split("| tee", 1)[0].replace("\\\n", " ")
    for var, value in (("${TP}", values["TP"]), ("${PP}", values["PP"]), ("${CHECKPOINT}", "PATH"),
                       ("${TOKENIZER_PATH}", "PATH"), ("${DATA_PATH}", "PATH"), ("${TASK}", "mmlu"),
                       ("${SEQ_LENGTH}", values["SEQ_LENGTH"])):
        body = body.replace(var, value)
    assert sorted(map(tuple, _reference_flags(size))) == sorted(map(tuple, [f.split() for f in
                                                                             re.split(r"\s(?=--)", body.strip())]))
    args = parse_args(shlex.split(body.replace("PATH", "/x")) + ["--results-file", "r.json"])
    assert args.tensor_model_parallel_size == tp and args.task == ["mmlu"] and args.no_chat_template
    cfg = resolve_model_config(args, None, 151669, "recipe")
    assert (cfg.num_layers, cfg.tie_word_embeddings, cfg.vocab_size, cfg.kv_channels, cfg.num_query_groups) == \
        (layers, tied, 151936, 128, 8)
    assert cfg.qk_layernorm and cfg.rotary_base == 1e6 and cfg.norm_epsilon == 1e-6 and args.seq_length == 4096


def test_evaluate_recipe_runs_on_the_tiny_model(tiny_qwen3, tmp_path):
    """The 0.6B recipe's flags with the tiny shape; its --max-position-embeddings differs from the checkpoint's
    (as 32768 does from Qwen3's 40960) and only bounds the prompts; --task-data-path is MMLU's data/test/."""
    from tests.recipes import TINY_SHAPE

    paths = build_tasks(tmp_path / "data")
    mg = _convert(tiny_qwen3, tmp_path / "mg", 1, 1)
    shape = {**TINY_SHAPE, "--max-position-embeddings": "300", "--seq-length": "4096"}
    argv: list[str] = []
    for flag, *vals in _reference_flags("0point6b"):
        vals = [shape[flag]] if flag in shape else vals
        vals = {"--load": [mg], "--tokenizer-name-or-path": [str(tiny_qwen3)],
                "--task-data-path": [str(paths["mmlu"] / "test")]}.get(flag, vals)
        argv += [flag, *vals]
    proc = run_cli("evaluation.py", *argv, "--results-file", str(tmp_path / "r.json"))
    summary = json.loads((tmp_path / "r.json").read_text())["tasks"]["mmlu"]
    assert summary["total"] == 6 and "mmlu acc = " in proc.stdout
    # the dev/ beside data/test/ gives the 5-shot block
    assert summary["items"][0]["prompt_tokens"] == len(_encode(tiny_qwen3, [expected_prompts()["mmlu"][0][1]],
                                                               chat=False)[0])
    long = tmp_path / "long"
    _csv(long / "x_test.csv", [["word " * 400, "a", "b", "c", "d", "A"]])
    argv[argv.index("--task-data-path") + 1] = str(long)
    proc = run_cli("evaluation.py", *argv, "--results-file", str(tmp_path / "r2.json"), check=False)
    assert proc.returncode == 2 and "exceeds --max-position-embeddings 300" in proc.stderr, proc.stderr


def test_error_rows_count_blank_lines(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c/s_test.csv").write_text("q,a,b,c,d,A\n\nq2,a,b,c,d,F\n")
    with pytest.raises(UserError, match=r"s_test.csv:3: answer 'F'"):
        choice_tasks.load_mmlu(tmp_path / "c", None)
    (tmp_path / "g").mkdir()
    (tmp_path / "g/test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q", "answer": "1"}\n')
    with pytest.raises(UserError, match=r"test.jsonl:3: the answer has no"):
        gen_tasks.load_gsm8k(tmp_path / "g", None, "en", cot=False)


# ---- empty subject files and --max-new-tokens for option tasks, through the CLI --------------------------------

@pytest.fixture(scope="module")
def tiny_mg(tiny_qwen3, tmp_path_factory) -> str:
    return _convert(tiny_qwen3, tmp_path_factory.mktemp("tiny_mg") / "mg", 1, 1)


def _evaluate(hf: Path, mg: str, results: Path, *flags: str, check: bool = True):
    return run_cli("evaluation.py", "--load", mg, "--tokenizer-name-or-path", str(hf), "--distributed-backend",
                   "gloo", "--no-chat-template", "--results-file", str(results), *flags, check=check)


def test_an_empty_subject_file_is_named_and_all_empty_is_an_error(tiny_qwen3, tiny_mg, tmp_path):
    paths = build_tasks(tmp_path / "data")
    empty = paths["mmlu"] / "test" / "virology_test.csv"
    empty.write_text("")
    proc = _evaluate(tiny_qwen3, tiny_mg, tmp_path / "r.json", "--task", "mmlu", "--task-data-path",
                     str(paths["mmlu"]))
    warnings = [ln for ln in proc.stdout.splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"warning: {empty}: empty, no questions; --task mmlu scores the other 2 of 3 subjects"), proc.stdout
    summary = json.loads((tmp_path / "r.json").read_text())["tasks"]["mmlu"]
    assert sorted(summary["subjects"]) == ["abstract_algebra", "anatomy"] and summary["total"] == 6
    assert "--max-new-tokens" not in proc.stderr            # not typed: no notice

    _csv(tmp_path / "none/a_test.csv", [])
    (tmp_path / "none/b_test.csv").write_text("\n\n")
    proc = _evaluate(tiny_qwen3, tiny_mg, tmp_path / "r2.json", "--task", "mmlu", "--task-data-path",
                     str(tmp_path / "none"), check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert errors[0] == (f"error: --task-data-path {tmp_path / 'none'}: all 2 subject files of --task mmlu are "
                         f"empty (a_test.csv, b_test.csv)")
    assert not (tmp_path / "r2.json").exists()


def test_empty_subject_files_of_each_directory_benchmark(tmp_path, caplog):
    paths = build_tasks(tmp_path)
    (paths["ceval"] / "val/law_val.csv").write_text("id,question,A,B,C,D,answer,explanation\n")   # header only
    _csv(paths["cmmlu"] / "test/law.csv", [], ["", "Question", "A", "B", "C", "D", "Answer"])
    (paths["bbh"] / "bbh/navigate.json").write_text(json.dumps({"examples": []}))
    (paths["agieval"] / "v1/sat-en.jsonl").write_text("")
    with caplog.at_level("WARNING", logger="mindspeed_llm.evaluation"):
        assert len(choice_tasks.load_ceval(paths["ceval"], None)) == 3
        assert len(choice_tasks.load_cmmlu(paths["cmmlu"], None)) == 3
        assert len(more_tasks.load_bbh(paths["bbh"], None, cot=False)) == 2
        assert len(more_tasks.load_agieval(paths["agieval"], None)[0]) == 3
    assert [r.getMessage().split(": empty")[0] for r in caplog.records] == \
        [f"warning: {paths['ceval'] / 'val/law_val.csv'}", f"warning: {paths['cmmlu'] / 'test/law.csv'}",
         f"warning: {paths['bbh'] / 'bbh/navigate.json'}", f"warning: {paths['agieval'] / 'v1/sat-en.jsonl'}"]
    assert "--task agieval scores the other 2 of 3 subjects" in caplog.records[-1].getMessage()


def test_max_new_tokens_is_a_notice_for_option_tasks_and_checked_for_generation(tiny_qwen3, tiny_mg, tmp_path):
    from mindspeed_llm.evaluation.args import parse_args

    base = ["--load", "x", "--tokenizer-name-or-path", "y", "--task-data-path", "d"]
    assert parse_args(base + ["--task", "mmlu", "boolq", "--max-new-tokens", "0"]).max_new_tokens == 0
    with pytest.raises(UserError, match=r"--max-new-tokens 0 must be at least 1 \(--task gsm8k generates\)"):
        parse_args(base + ["--task", "mmlu", "gsm8k", "--max-new-tokens", "0"])

    paths = build_tasks(tmp_path / "data")
    # far more new tokens than the model has positions: option tasks generate nothing and run as without it
    proc = _evaluate(tiny_qwen3, tiny_mg, tmp_path / "r.json", "--task", "mmlu", "boolq", "--task-data-path",
                     str(paths["mmlu"]), str(paths["boolq"]), "--max-new-tokens", "100000")
    notices = [ln for ln in proc.stderr.splitlines() if "--max-new-tokens" in ln]
    assert notices == ["[mindspeed_llm] --max-new-tokens: accepted, no effect for --task mmlu, boolq: option answers "
                       "are scored by the next token's log-probabilities; nothing is generated"], proc.stderr
    tasks = json.loads((tmp_path / "r.json").read_text())["tasks"]
    for task in ("mmlu", "boolq"):
        _check_choice_task(tasks[task], tiny_qwen3, expected_prompts()[task], chat=False)
    # a generation task still needs the room
    proc = _evaluate(tiny_qwen3, tiny_mg, tmp_path / "r2.json", "--task", "gsm8k", "--task-data-path",
                     str(paths["gsm8k"]), "--max-new-tokens", "100000", check=False)
    assert proc.returncode == 2 and "error: --max-new-tokens 100000 leaves no room for a prompt" in proc.stderr
    assert "no effect" not in proc.stderr

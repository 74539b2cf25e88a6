"""A hand-made PIQA-style task with known answers, an asset root that serves it, and hand scoring."""
import json
from pathlib import Path

import torch

# gold 0 is a likely story continuation, gold 1 (third doc) is gibberish: a model that reads the text right
# gets 3 of 4. The margins are tens of nats, so tokenisation details cannot flip an answer.
DOCS = [
    {"query": "Question: Lily went to the park with her mom. What did she see?\n",
     "choices": ["She saw a big dog and a red ball.", "Zq vkx pwq jjf xqz qqv."], "gold": 0},
    {"query": "Question: Tom was sad because he lost his toy. What did his mom do?\n",
     "choices": ["His mom gave him a hug.", "Xxv kqz wpj zzq vvk."], "gold": 0},
    {"query": "Question: The sun was shining and the birds were happy. What did they do?\n",
     "choices": ["They sang a happy song.", "Qjx zvk pqw xxj kkz."], "gold": 1},
    {"query": "Question: Ben and Sue wanted to play. Where did they go?\n",
     "choices": ["They went to the park to play.", "Vqz jxk wwq zkp qxj."], "gold": 0},
]


def offline_assets(tmp_path: Path, real_root: Path) -> Path:
    """An asset root whose piqa.jsonl is DOCS; every other model and file links to the real asset root."""
    root = tmp_path / "assets"
    (root / "data" / "commonsense").mkdir(parents=True)
    (root / "models").symlink_to(real_root / "models")
    for item in (real_root / "data").iterdir():
        if item.name != "commonsense":
            (root / "data" / item.name).symlink_to(item)
    for item in (real_root / "data" / "commonsense").iterdir():
        if item.name != "piqa.jsonl":
            (root / "data" / "commonsense" / item.name).symlink_to(item)
    (root / "data" / "commonsense" / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return root


def hand_scores(model, tokenizer) -> tuple[float, float, float]:
    """(acc, acc_norm, smallest margin in nats): each choice scored by the summed log-probability of its tokens
    after "query + Answer:" (PIQA's prompt), acc_norm dividing by the choice's length in characters."""
    right, right_norm, margin = 0, 0, float("inf")
    with torch.no_grad():
        for doc in DOCS:
            context = doc["query"] + "Answer:"
            n_context = len(tokenizer.encode(context))
            lls = []
            for choice in doc["choices"]:
                ids = tokenizer.encode(context + " " + choice)
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(n_context, len(ids))))
            margin = min(margin, abs(lls[0] - lls[1]))
            right += int(max(range(2), key=lambda i: lls[i]) == doc["gold"])
            norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
            right_norm += int(max(range(2), key=lambda i: norm[i]) == doc["gold"])
    return right / len(DOCS), right_norm / len(DOCS), margin

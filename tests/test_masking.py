"""Whole-word masking and BERT's 80/10/10 replacement, vectorised: the rules, the ratios, the invariances."""

import pytest
import torch

from retromae.masking import (
    TokenizerError,
    TokenTables,
    corrupt,
    mask_targets,
    maskable_positions,
    per_row_whole_word_masks,
    whole_word_mask,
    word_index,
)
from retromae.rng import example_seeds

# A hand-made vocabulary: 0 [PAD], 1 [CLS], 2 [SEP], 3 [MASK], 4.. words, and '##' pieces.
VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "un", "##believ", "##able", "story", "the", "##s", "cat", "sat"]
ID = {t: i for i, t in enumerate(VOCAB)}


def hand_tables() -> TokenTables:
    special = torch.tensor([t.startswith("[") for t in VOCAB])
    continuation = torch.tensor([t.startswith("##") for t in VOCAB])
    return TokenTables(special, continuation, torch.nonzero(~special).squeeze(1), ID["[MASK]"], ID["[PAD]"])


def encode(*rows: list[str], length: int | None = None):
    length = length or max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor([ID[t] for t in r])
        attention[i, : len(r)] = 1
    return ids, attention


def random_texts(n: int, length: int, seed: int = 0):
    """Rows of [CLS] w w ##p w ... [SEP] [PAD]..., with words of 1-3 pieces and random lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        size = int(torch.randint(length // 2, length - 1, (1,), generator=g))
        row = ["[CLS]"]
        while len(row) < size:
            row.append(["un", "story", "the", "cat", "sat"][int(torch.randint(5, (1,), generator=g))])
            for _ in range(int(torch.randint(3, (1,), generator=g))):
                row.append(["##believ", "##able", "##s"][int(torch.randint(3, (1,), generator=g))])
        rows.append(row[: length - 1] + ["[SEP]"])
    return encode(*rows, length=length)


def test_word_index_follows_wordpiece_continuations():
    ids, attention = encode(["[CLS]", "un", "##believ", "##able", "story", "the", "##s", "[SEP]", "[PAD]"])
    tables = hand_tables()
    words = word_index(ids, maskable_positions(ids, attention, tables), tables)
    assert words.tolist() == [[-1, 0, 0, 0, 1, 2, 2, -1, -1]]


def test_a_continuation_after_a_special_token_starts_a_word():
    ids, attention = encode(["[CLS]", "##s", "cat", "[SEP]"])
    tables = hand_tables()
    assert word_index(ids, maskable_positions(ids, attention, tables), tables).tolist() == [[-1, 0, 1, -1]]


@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.5])
def test_whole_word_mask_rules_and_ratio(ratio):
    tables = hand_tables()
    ids, attention = random_texts(400, 64)
    maskable = maskable_positions(ids, attention, tables)
    words = word_index(ids, maskable, tables)
    mask = whole_word_mask(words, ratio, example_seeds(3, 0, torch.arange(400)), stream=1)
    assert not (mask & ~maskable).any(), "special tokens and padding are never masked"
    for b in range(400):  # every piece of a word shares its word's fate
        for w in words[b].unique():
            if w >= 0:
                states = mask[b][words[b] == w]
                assert states.all() or not states.any()
    counts, targets = mask.sum(-1), mask_targets(maskable, ratio)
    assert (counts >= targets).all() and (counts <= targets + 2).all()  # longest word: 3 pieces
    share = counts.sum().item() / maskable.sum().item()
    assert abs(share - ratio) < 0.02


def test_mask_depends_on_the_example_not_the_batch_or_padding():
    tables = hand_tables()
    ids, attention = random_texts(8, 40)
    seeds = example_seeds(5, 2, torch.arange(10, 18))
    words = word_index(ids, maskable_positions(ids, attention, tables), tables)
    together = whole_word_mask(words, 0.3, seeds, 1)
    padded_ids = torch.nn.functional.pad(ids[3:4], (0, 24))
    padded_attention = torch.nn.functional.pad(attention[3:4], (0, 24))
    alone_words = word_index(padded_ids, maskable_positions(padded_ids, padded_attention, tables), tables)
    alone = whole_word_mask(alone_words, 0.3, seeds[3:4], 1)
    assert torch.equal(alone[0, :40], together[3]) and not alone[0, 40:].any()
    rows = per_row_whole_word_masks(words, 0.5, seeds, 11)
    rows_alone = per_row_whole_word_masks(alone_words, 0.5, seeds[3:4], 11)
    assert torch.equal(rows_alone[0, :40, :40], rows[3])


def test_corrupt_replaces_80_10_10():
    tables = hand_tables()
    ids, attention = random_texts(500, 64, seed=1)
    maskable = maskable_positions(ids, attention, tables)
    seeds = example_seeds(0, 0, torch.arange(500))
    mask = whole_word_mask(word_index(ids, maskable, tables), 0.3, seeds, 1)
    out = corrupt(ids, mask, seeds, tables, (2, 3))
    assert torch.equal(out[~mask], ids[~mask]), "unmasked tokens are untouched"
    masked_out, masked_in = out[mask], ids[mask]
    to_mask = (masked_out == tables.mask_id).float().mean().item()
    kept = (masked_out == masked_in).float().mean().item()
    assert abs(to_mask - 0.8) < 0.02
    # a random draw can land on the original token: kept = 10% + 10% * 1/len(replacement ids)
    assert abs(kept - (0.1 + 0.1 / len(tables.replacement_ids))) < 0.015
    randomised = masked_out[(masked_out != tables.mask_id) & (masked_out != masked_in)]
    assert not tables.special[randomised].any(), "random replacements are ordinary tokens"


def test_per_row_masks_are_whole_word_fresh_and_at_ratio():
    tables = hand_tables()
    ids, attention = random_texts(32, 48, seed=2)
    maskable = maskable_positions(ids, attention, tables)
    words = word_index(ids, maskable, tables)
    rows = per_row_whole_word_masks(words, 0.5, example_seeds(0, 0, torch.arange(32)), 11)
    assert not (rows & ~maskable[:, None, :]).any()
    b = 0
    valid = maskable[b]
    for i in range(48):
        for w in words[b][valid].unique():
            states = rows[b, i][words[b] == w]
            assert states.all() or not states.any()
    distinct = {tuple(rows[b, i].tolist()) for i in range(48)}
    assert len(distinct) > 40, "each row draws its own mask"
    share = rows.sum().item() / (maskable.sum(-1) * 48).sum().item()
    assert abs(share - 0.5) < 0.02


def test_tokenizer_without_mask_token_is_refused(tiny_tokenizer):
    import copy

    broken = copy.deepcopy(tiny_tokenizer)
    broken.mask_token = None
    with pytest.raises(TokenizerError, match="no mask token"):
        TokenTables.from_tokenizer(broken, name="my-tokenizer")


def test_tables_from_a_real_wordpiece_tokenizer(tiny_tokenizer):
    tables = TokenTables.from_tokenizer(tiny_tokenizer)
    vocab = tiny_tokenizer.get_vocab()
    assert all(tables.continuation[i] == t.startswith("##") for t, i in vocab.items())
    assert tables.special[tiny_tokenizer.cls_token_id] and tables.special[tiny_tokenizer.pad_token_id]
    assert not tables.special[tables.replacement_ids].any()


# ----- rules pinned after mutation testing (docs/mutation.md) ------------------------------------------------


def test_capped_proportional_is_the_water_filling_solution_by_hand():
    from retromae.masking import capped_proportional

    # row 0: weights 0.4, 0.1, 0.1 (and a slot past the last word), word lengths 1, 2, 1, target 3 tokens.
    #   uncapped: lambda (0.4*1 + 0.1*2 + 0.1*1) = 3 -> lambda = 30/7, p0 = 12/7 > 1: word 0 capped at 1;
    #   the rest: lambda (0.1*2 + 0.1*1) = 3 - 1 -> lambda = 20/3, p1 = p2 = 2/3 (2/3*2 + 2/3*1 = 2 tokens).
    # row 1: target 0: nothing. row 2: four words of one token, equal weights, target 2: 1/2 each.
    weights = torch.tensor([[0.4, 0.1, 0.1, 0.7], [0.4, 0.1, 0.1, 0.7], [1.0, 1.0, 1.0, 1.0]])
    lengths = torch.tensor([[1, 2, 1, 0], [1, 2, 1, 0], [1, 1, 1, 1]])
    p = capped_proportional(weights, lengths, torch.tensor([3, 0, 2]))
    expected = torch.tensor([[1.0, 2 / 3, 2 / 3, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    assert torch.allclose(p, expected, atol=1e-6), p


def test_weighted_word_choice_follows_weights_below_one():
    """One of two one-token words is masked (ratio 0.5): by Efraimidis-Spirakis keys the heavier word is chosen with
    probability w1 / (w0 + w1) = 0.95 for weights 0.05 and 0.95 (both below 1, where a clamp would flatten them)."""
    from retromae.masking import weighted_whole_word_mask
    from retromae.rng import example_seeds

    n = 4000
    words = torch.tensor([[0, 1]]).repeat(n, 1)
    mask = weighted_whole_word_mask(words, torch.tensor([[0.05, 0.95]]).repeat(n, 1), 0.5,
                                    example_seeds(3, 0, torch.arange(n)), 7)
    assert (mask.sum(-1) == 1).all()
    assert 0.93 < mask[:, 1].float().mean().item() < 0.97


def test_weighted_word_mask_counts_the_first_word_as_maskable():
    """Two one-token words (word ids 0 and 1), ratio 0.75: round(0.75 * 2) = 2 tokens, so both are masked."""
    from retromae.masking import weighted_whole_word_mask
    from retromae.rng import example_seeds

    mask = weighted_whole_word_mask(torch.tensor([[0, 1, -1]] * 8), torch.ones(8, 2), 0.75,
                                    example_seeds(1, 0, torch.arange(8)), 7)
    assert mask.tolist() == [[True, True, False]] * 8


def test_per_row_word_masks_read_each_words_own_probability():
    """Word 0 has probability 0, word 1 probability 1: in every row its columns are never / always hidden, and the
    padding column never; the rows asked for alone equal those rows of the whole matrix."""
    from retromae.masking import per_row_word_masks
    from retromae.rng import example_seeds

    words = torch.tensor([[0, 0, 1, 2, -1]])
    probability = torch.tensor([[0.0, 1.0, 0.5]])
    seeds = example_seeds(5, 0, torch.arange(1))
    full = per_row_word_masks(words, probability, seeds, 11)
    assert full.shape == (1, 5, 5)
    assert not full[0, :, :2].any() and full[0, :, 2].all() and not full[0, :, 4].any()
    rows = torch.tensor([3, 1])
    assert torch.equal(per_row_word_masks(words, probability, seeds, 11, rows), full[:, rows])


def test_token_tables_move_with_every_field():
    from retromae.masking import TokenTables

    tables = TokenTables(torch.tensor([True, False]), torch.tensor([False, True]), torch.tensor([1]), 5, 0)
    moved = tables.to("cpu")
    assert torch.equal(moved.special, tables.special) and torch.equal(moved.continuation, tables.continuation)
    assert torch.equal(moved.replacement_ids, tables.replacement_ids)
    assert (moved.mask_id, moved.pad_id) == (5, 0)

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


def _metaspace_bpe(texts):
    """A BPE model behind a SentencePiece-style Metaspace pre-tokenizer (as Llama-like vocabularies are)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<pad>", "<unk>", "<mask>", "<s>", "</s>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   bos_token="<s>", eos_token="</s>")


def _wordpiece_with_prefix(texts, prefix="@@"):
    """A WordPiece vocabulary whose continuation pieces start with another prefix than '##'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=prefix))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]"]
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials,
                                                                 continuing_subword_prefix=prefix))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", backend.token_to_id("[CLS]")),
                                                 ("[SEP]", backend.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]")


@pytest.mark.parametrize("family, start_marker", [("bert", None), ("roberta", "\u0120"), ("xlm-roberta", "\u2581"),
                                                  ("metaspace-bpe", "\u2581"), ("wordpiece-@@", None)])
def test_word_boundaries_follow_each_vocabularys_marker(family, start_marker):
    """WordPiece marks a word's continuation with '##'; byte-level BPE marks a word's start with 'Ġ', SentencePiece
    with '▁': every ordinary vocabulary entry is a continuation exactly when its marker says so."""
    from retromae.masking import TokenTables
    from retromae.tiny import TOKENIZERS, make_tokenizer

    texts = ["the cat sat on the mat", "dogs chase cats in gardens", "a completely unrelated text about stars"] * 4
    if family == "metaspace-bpe":
        tokenizer = _metaspace_bpe(texts)
    elif family == "wordpiece-@@":
        tokenizer = _wordpiece_with_prefix(texts)
    else:
        tokenizer = make_tokenizer(TOKENIZERS[family], texts, vocab_size=120, max_positions=64)
    tables = TokenTables.from_tokenizer(tokenizer)
    special = set(tokenizer.all_special_ids)
    ordinary = {t: i for t, i in tokenizer.get_vocab().items() if i not in special}
    prefix = "@@" if family == "wordpiece-@@" else "##"
    expected = {t: t.startswith(prefix) if start_marker is None else not t.startswith(start_marker) for t in ordinary}
    assert sum(expected.values()) > 0 and sum(not v for v in expected.values()) > 0, "both kinds occur"
    assert {t: bool(tables.continuation[i]) for t, i in ordinary.items()} == expected


def test_mask_targets_round_and_keep_at_least_one_where_any_exists():
    from retromae.masking import mask_targets

    maskable = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    # 0 tokens: 0; 1 token: round(0.15) = 0 -> at least 1; 6 tokens: round(0.9) = 1
    assert mask_targets(maskable, 0.15).tolist() == [0, 1, 1]
    assert mask_targets(maskable, 0.5).tolist() == [0, 1, 3]  # round(0.5) = 0 -> 1; round(3.0) = 3


def test_choose_words_per_row_by_hand():
    """(B=2, R=2, W=3) priorities, word lengths [[2, 1, 0], [1, 1, 1]], 2 tokens each: words are taken in priority
    order while fewer than 2 tokens are taken; an empty slot (length 0) is never taken."""
    from retromae.masking import choose_words

    lengths = torch.tensor([[2, 1, 0], [1, 1, 1]])
    priority = torch.tensor([[[0.1, 0.5, 0.9], [0.6, 0.2, 0.0]],
                             [[0.3, 0.2, 0.1], [0.1, 0.9, 0.5]]])
    chosen = choose_words(lengths, torch.tensor([2, 2]), priority)
    # b0 r0: word 0 (2 tokens) first, then 2 < 2 fails; b0 r1: word 1 (0.2), then word 0 (1 < 2), 3 tokens;
    # b1 r0: words 2, 1; b1 r1: words 0, 2
    assert chosen.tolist() == [[[True, False, False], [True, True, False]],
                               [[False, True, True], [True, False, True]]]
    assert not choose_words(lengths, torch.tensor([9, 9]), priority)[0, :, 2].any(), "empty slots never taken"


def test_derived_seeds_keep_seeds_and_salts_apart():
    from retromae.masking import derived_seeds

    seeds = torch.arange(-500, 500, dtype=torch.int32)
    assert derived_seeds(seeds, 3).unique().numel() == 1000, "distinct seeds stay distinct"
    per_salt = torch.stack([derived_seeds(seeds[:4], salt) for salt in range(64)])
    assert per_salt[:, 0].unique().numel() == 64, "distinct salts give distinct seeds"


def test_each_word_of_a_row_gets_its_own_draw():
    """64 one-token words, each hidden with probability 0.5 in each of 64 rows: no two words share their draws."""
    from retromae.masking import per_row_word_masks

    words = torch.arange(64)[None]
    masks = per_row_word_masks(words, torch.full((1, 64), 0.5), example_seeds(2, 0, torch.arange(1)), 5)[0]
    columns = {tuple(masks[:, j].tolist()) for j in range(64)}
    assert len(columns) == 64
    assert 0.4 < masks.float().mean().item() < 0.6


def test_sequences_up_to_the_counter_limit_are_accepted():
    from retromae.masking import MAX_POSITIONS, _row_word_counters

    assert _row_word_counters(torch.zeros(1, MAX_POSITIONS, dtype=torch.long), torch.tensor([0])).shape == (
        1, 1, MAX_POSITIONS)
    with pytest.raises(ValueError, match="exceeds"):
        _row_word_counters(torch.zeros(1, MAX_POSITIONS + 1, dtype=torch.long), torch.tensor([0]))


def test_random_replacements_cover_the_whole_replacement_set():
    """BERT's 10% random tokens are drawn uniformly from the ordinary vocabulary: here 3 ids, each about a third of
    the random replacements, independently of the draw that chose random over [MASK] or keep."""
    from retromae.masking import TokenTables, corrupt

    tables = TokenTables(torch.zeros(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool), torch.tensor([5, 6, 7]),
                         9, 0)
    n = 20000
    ids = torch.ones(1, n, dtype=torch.long)
    out = corrupt(ids, torch.ones(1, n, dtype=torch.bool), example_seeds(4, 0, torch.arange(1)), tables, (1, 2))
    replaced = out[(out != 9) & (out != 1)]
    assert 0.08 < replaced.numel() / n < 0.12 and 0.77 < (out == 9).float().mean().item() < 0.83
    for token in (5, 6, 7):
        assert 0.28 < (replaced == token).float().mean().item() < 0.39, token


def test_every_word_can_be_deleted_with_its_probability():
    """TSDAE's deletion: word 0 is a word like any other (deleted in about 60% of rows at probability 0.6)."""
    from retromae.masking import delete_words

    n = 2000
    words = torch.tensor([[0, 0, 1, 2, 3, -1]]).repeat(n, 1)
    deleted = delete_words(words, 0.6, example_seeds(6, 0, torch.arange(n)), 3)
    assert torch.equal(deleted[:, 0], deleted[:, 1]), "a word's tokens go together"
    assert 0.55 < deleted[:, 0].float().mean().item() < 0.65
    assert not deleted[:, 5].any() and (~deleted[:, :5]).any(-1).all(), "padding never, one word always kept"


def test_kept_layout_rounds_the_width_up_to_its_multiple():
    from retromae.masking import kept_layout

    keep = torch.zeros(2, 20, dtype=torch.bool)
    keep[0, [2, 5, 7]] = True
    keep[1, [0]] = True
    index, valid = kept_layout(keep)
    assert index.shape == (2, 8) and valid.sum(-1).tolist() == [3, 1]
    assert index[0, :3].tolist() == [2, 5, 7] and index[1, 0].item() == 0
    single = torch.zeros(1, 20, dtype=torch.bool)
    single[0, 4] = True
    assert kept_layout(single, multiple=1)[0].tolist() == [[4]]


def test_per_row_whole_word_masks_of_chosen_rows_equal_those_rows_of_the_whole():
    from retromae.masking import per_row_whole_word_masks

    words = torch.tensor([[0, 0, 1, 2, 3, 4, -1], [0, 1, 1, 2, -1, -1, -1]])
    seeds = example_seeds(8, 0, torch.arange(2))
    full = per_row_whole_word_masks(words, 0.5, seeds, 13)
    rows = torch.tensor([5, 0, 2])
    assert torch.equal(per_row_whole_word_masks(words, 0.5, seeds, 13, rows), full[:, rows])
    assert full[0, :, 0].tolist() == full[0, :, 1].tolist(), "a word's pieces share their draw"


def test_token_tables_cover_the_model_vocabulary_and_refuse_a_text_start_without_a_special_token():
    from retromae.masking import TokenizerError, TokenTables
    from retromae.tiny import TOKENIZERS, make_tokenizer

    texts = ["the cat sat on the mat", "dogs chase cats in gardens"] * 4
    tokenizer = make_tokenizer(TOKENIZERS["bert"], texts, vocab_size=80, max_positions=64)
    assert TokenTables.from_tokenizer(tokenizer).special.shape == (len(tokenizer),)
    # a model whose embedding table is larger than the tokenizer (padded vocabularies): the tables cover it
    assert TokenTables.from_tokenizer(tokenizer, vocab_size=len(tokenizer) + 7).special.shape == (len(tokenizer) + 7,)
    bare = _metaspace_bpe(texts)
    bare.backend_tokenizer.post_processor = None  # nothing before the text: position 0 would be a word
    with pytest.raises(TokenizerError, match="no special token before a text"):
        TokenTables.from_tokenizer(bare)


def test_word_boundaries_of_a_tokenizer_without_a_backend():
    """A tokenizer object without a fast backend: '##' pieces in its vocabulary mark continuations; a vocabulary
    with no marker at all is refused."""
    from types import SimpleNamespace

    from retromae.masking import TokenizerError, _word_marker

    assert _word_marker(SimpleNamespace(get_vocab=lambda: {"cat": 0, "##s": 1}, name_or_path="x")) == (
        "continuation-prefix", "##")
    with pytest.raises(TokenizerError, match="cannot tell word boundaries"):
        _word_marker(SimpleNamespace(get_vocab=lambda: {"cat": 0, "s": 1}, name_or_path="x"))

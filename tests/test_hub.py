from diffad.hub import model_card


def test_model_card_describes_the_checkpoint(tiny_checkpoint):
    card = model_card(tiny_checkpoint, "someone/diffad-checkpoints", "cc-by-nc-sa-4.0", "Generated parts.")
    assert card.startswith("---\nlibrary_name: diffad\nlicense: cc-by-nc-sa-4.0")
    assert "# diffad checkpoint: part" in card and "Resolution 32 px" in card
    assert 'load_checkpoint("someone/diffad-checkpoints", category="part")' in card
    assert "Generated parts." in card

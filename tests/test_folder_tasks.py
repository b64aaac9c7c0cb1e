"""The folder source with several kinds of example (caption pairs, edits, questions) mixed in one file, read through
configs/shapes_unified.py's field-to-segment map: items, placeholders, skips by reason, training, and the error for
a file with nothing usable."""

import json
import logging
import pickle

import numpy as np
from PIL import Image
import pytest

from test_unified import unified_config as tiny_unified_config  # tests/ is on sys.path (as test_train)
from unimm_jax import train
from unimm_jax.data import folder, input_pipeline, shapes, shapes_tasks

IMAGE_KEYS = ('image', 'source', 'target')
TEXT_KEYS = ('text', 'instruction', 'question', 'answer')


def unified_config(data_dir, **overrides):
  """test_unified's tiny configs/shapes_unified.py, reading the folder ``data_dir``."""
  return tiny_unified_config(**{"data.source": "folder", "data.path": str(data_dir), "data.fit_examples": 32,
                                "train.batch_size": 4, "eval.batch_size": 4, "data.kind_rows": (), **overrides})


def _save(root, name, image):
  Image.fromarray(image).save(root / name)
  return name


def _good_lines(root, split, n):
  """n lines of each kind, in turn (caption, edit, vqa), with their 24x24 images written to root; a question
  shares its image file with the caption before it."""
  lines = []
  for i in range(n):
    _, image, caption = shapes.sample_example(split, 3, i)
    edit = shapes_tasks.sample_edit(split, 3, i)
    q = shapes_tasks.sample_question(split, 3, i)
    lines.append({'image': _save(root, f'{split}_c{i}.png', image), 'text': caption})
    lines.append({'source': _save(root, f'{split}_s{i}.png', shapes.render(edit.source)),
                  'instruction': edit.instruction,
                  'target': _save(root, f'{split}_t{i}.png', shapes.render(edit.target))})
    lines.append({'image': f'{split}_c{i}.png', 'question': q.question, 'answer': q.answer})
  return lines


def _bad_lines(root):
  """One line for each reason (two bad_line), and the reasons they are expected to be skipped for."""
  (root / 'broken.png').write_bytes(b'\x89PNG not really an image')
  _save(root, 'ok.png', np.full((24, 24, 3), 200, np.uint8))
  lines = [
      {'source': 'ok.png', 'instruction': 'make it blue', 'target': 'gone.png'},    # missing_image
      {'image': 'broken.png', 'question': 'what colour?', 'answer': 'red'},         # unreadable_image
      {'source': 'ok.png', 'instruction': '   ', 'target': 'ok.png'},               # empty_instruction
      {'image': 'ok.png', 'question': '', 'answer': 'red'},                          # empty_question
      {'image': 'ok.png', 'question': 'what colour?', 'answer': ' '},                # empty_answer
      {'image': 'ok.png', 'text': '\t'},                                             # empty_caption
      {'source': 'ok.png', 'instruction': 'make it blue'},                           # incomplete_example: no target
      {'image': 'ok.png', 'text': 'a grey image', 'target': 'ok.png'},               # incomplete_example: a stray field
      {'image': 'ok.png', 'text': 'a grey image', 'question': 'what?', 'answer': 'grey'},   # mixed_kinds
      '{"image": "ok.png", "text": ',                                                # bad_line: not JSON
      {'image': 'ok.png', 'text': 7},                                                # bad_line: not a string
      '',                                                                             # blank: ignored
  ]
  expected = {'bad_line': 2, 'incomplete_example': 2, 'mixed_kinds': 1, 'empty_caption': 1, 'empty_instruction': 1,
              'empty_question': 1, 'empty_answer': 1, 'missing_image': 1, 'unreadable_image': 1}
  return lines, expected


def _write(path, lines):
  path.write_text(''.join((l if isinstance(l, str) else json.dumps(l)) + '\n' for l in lines))


def _mixed_folder(root, n_train=4, n_val=2):
  root.mkdir(parents=True, exist_ok=True)
  good = _good_lines(root, 'train', n_train)
  bad, expected = _bad_lines(root)
  # Bad lines among the good ones, not only at the end.
  _write(root / 'train.jsonl', good[:3] + bad[:6] + good[3:] + bad[6:])
  _write(root / 'val.jsonl', _good_lines(root, 'val', n_val))
  return good, expected


def test_the_unified_config_reads_these_fields_mixed():
  config = unified_config('unused')
  assert input_pipeline.source_keys(config) == (IMAGE_KEYS, TEXT_KEYS)
  assert [name for name, _ in folder.source_kinds(IMAGE_KEYS, TEXT_KEYS)] == ['caption', 'edit', 'vqa']
  assert folder.MISSING_KEY == input_pipeline.MISSING_KEY
  # Today's caption layout: one kind, every field needed; a field of no kind in a mixed source is an error.
  assert folder.source_kinds() == (('caption', ('image', 'text')),)
  assert folder.skip_reasons() == ('bad_line', 'empty_caption', 'missing_image', 'unreadable_image')
  with pytest.raises(ValueError, match=r"fields \['mask'\] belong to none of the kinds"):
    folder.source_kinds(IMAGE_KEYS + ('mask',), TEXT_KEYS)


def test_mixed_lines_give_items_with_placeholders_and_skips_by_reason(tmp_path, caplog):
  good, expected = _mixed_folder(tmp_path)
  with caplog.at_level(logging.INFO):
    src = folder.FolderSource(tmp_path, 'train', 24, 3, image_keys=IMAGE_KEYS, text_keys=TEXT_KEYS)
  assert src.skipped == expected and list(src.skipped) == [r for r in folder.SKIP_REASONS if r in expected]
  assert src.kind_counts == {'caption': 4, 'edit': 4, 'vqa': 4} and len(src) == len(good) == 12
  assert (f'folder source {tmp_path / "train.jsonl"}: 12 usable (4 caption, 4 edit, 4 vqa), skipped 2 bad_line, '
          '2 incomplete_example, 1 mixed_kinds, 1 empty_caption, 1 empty_instruction, 1 empty_question, '
          '1 empty_answer, 1 missing_image, 1 unreadable_image') in caplog.text
  blank = np.zeros((24, 24, 3), np.uint8)
  lacks = {'caption': {'source', 'target', 'instruction', 'question', 'answer'},
           'edit': {'image', 'text', 'question', 'answer'},
           'vqa': {'source', 'target', 'text', 'instruction'}}
  for i, line in enumerate(good):   # the usable lines, in file order
    item = src[i]
    kind = ('caption', 'edit', 'vqa')[i % 3]
    assert set(item) == set(IMAGE_KEYS + TEXT_KEYS) | {'missing'}       # every item has every field
    assert input_pipeline.missing_fields(item) == lacks[kind]
    for key in IMAGE_KEYS:
      assert item[key].shape == (24, 24, 3) and item[key].dtype == np.uint8
      if key in line:   # the PNG as written (24x24: no resize)
        np.testing.assert_array_equal(item[key], np.asarray(Image.open(tmp_path / line[key])))
      else:
        np.testing.assert_array_equal(item[key], blank)
    for key in TEXT_KEYS:
      assert item[key] == line.get(key, '').strip()
  # A question shares its image file with the caption before it: one decoded copy, equal items, separate copies.
  assert len(src._pixels) == 4 * 3
  np.testing.assert_array_equal(src[2]['image'], src[0]['image'])
  src[2]['image'][:] = 0
  assert src[2]['image'].any()
  back = pickle.loads(pickle.dumps(src))
  assert len(back) == len(src) and back.skipped == src.skipped
  assert all(back[i]['missing'] == src[i]['missing'] for i in range(len(src)))


def test_a_caption_layout_reads_only_the_caption_lines_of_a_mixed_file(tmp_path):
  _mixed_folder(tmp_path)
  src = folder.FolderSource(tmp_path, 'train', 24, 3)
  # Today's items and counts: an edit or a question has no 'text' (bad_line); a line with a caption and a question
  # is a caption pair here, the question not read.
  assert set(src[0]) == {'image', 'text'}
  assert src.skipped == {'bad_line': 2 + 4 + 4 + 6, 'empty_caption': 1, 'missing_image': 0, 'unreadable_image': 0}
  assert len(src) == 4 + 2


def test_nothing_usable_is_an_error_naming_the_file_and_the_counts(tmp_path):
  _save(tmp_path, 'ok.png', np.full((24, 24, 3), 9, np.uint8))
  _write(tmp_path / 'train.jsonl', [
      {'source': 'ok.png', 'instruction': 'x'},
      {'source': 'ok.png', 'instruction': ' ', 'target': 'ok.png'},
      {'image': 'gone.png', 'question': 'what?', 'answer': 'red'},
      'nonsense',
  ])
  config = unified_config(tmp_path)
  with pytest.raises(ValueError) as err:
    input_pipeline.make_source(config, 'train')
  message = str(err.value)
  assert (f'{tmp_path / "train.jsonl"}: 0 usable (0 caption, 0 edit, 0 vqa), skipped 1 bad_line, '
          '1 incomplete_example, 1 empty_instruction, 1 missing_image') in message
  # ... and what a line should look like.
  assert 'edit {"source": "a.png", "instruction": "...", "target": "a.png"}' in message


def test_unified_config_trains_on_a_mixed_folder_and_reports_the_skips(tmp_path):
  _, expected = _mixed_folder(tmp_path / 'data')
  report = train.train_and_evaluate(unified_config(tmp_path / 'data'), tmp_path / 'run')
  assert report['step'] == 3 and len(report['history']) == 3
  assert all(np.isfinite(v) for v in report['val_bits_per_token'].values())
  assert report['data_skipped']['train'] == expected
  assert sum(report['data_skipped']['val'].values()) == 0
  assert [s['name'] for s in report['sequence']['segments']] == ['text', 'image', 'target', 'answer']

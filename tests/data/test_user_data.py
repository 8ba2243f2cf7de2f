"""Your own data (issue 14): an interaction log in the generic format trains and evaluates with
the leave-one-out protocol through gin, and every bad row is named by file, line and field."""

import os

import numpy as np
import pytest

from oxyjax.data import pipeline, readers, user_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOG = """user_id,item_id,timestamp,action
u1,a,30,click
u2,x,5,click
u1,b,10,click
u1,c,20,purchase
u2,y,6,click
u1,d,20,click
u3,a,1,click
u3,b,2,click
u2,z,2020-01-01T00:00:00,click
"""


def _write(tmp_path, text, name="log.csv"):
  p = tmp_path / name
  p.write_text(text)
  return p


def test_leave_one_out_by_timestamp_with_ties_in_file_order(tmp_path):
  ds = readers.read_interactions(_write(tmp_path, LOG), name="t")
  # u1: b(10), c(20), d(20, after c in the file), a(30); u2: x(5), y(6), z(2020); u3 dropped (2 rows)
  assert ds.dropped_users == 1 and ds.num_users == 2 and ds.actions == {"click": 8, "purchase": 1}
  raw = lambda seq: [ds.raw_item_ids[i] for i in seq]
  u1, u2 = ds.user_index["u1"], ds.user_index["u2"]
  assert [(raw(e.history), ds.raw_item_ids[e.target]) for e in ds.test if e.user == u1] == [(["b", "c", "d"], "a")]
  assert [(raw(e.history), ds.raw_item_ids[e.target]) for e in ds.validation if e.user == u1] == [(["b", "c"], "d")]
  assert [(raw(e.history), ds.raw_item_ids[e.target]) for e in ds.train if e.user == u1] == [(["b"], "c")]
  assert [(raw(e.history), ds.raw_item_ids[e.target]) for e in ds.test if e.user == u2] == [(["x", "y"], "z")]
  assert not [e for e in ds.train if e.user == u2]  # 3 items: no training example
  assert "u3" not in ds.user_index and set(ds.raw_item_ids[1:]) == {"a", "b", "c", "d", "x", "y", "z"}


def test_tsv_and_item_file(tmp_path):
  log = _write(tmp_path, LOG.replace(",", "\t"), "log.tsv")
  items = _write(tmp_path, "item\ttitle\tcategories\na\tApple pie\tFood > Sweet\nq\tUnused\t\n", "items.tsv")
  ds = readers.read_interactions(log, items, name="t")
  assert ds.item_meta[ds.item_index["a"]].title == "Apple pie"
  assert ds.item_meta[ds.item_index["a"]].categories == "Food > Sweet"
  assert ds.item_meta[ds.item_index["b"]] == readers.ItemMeta()  # not in the item file: empty text
  assert "q" not in ds.item_index  # item file rows nobody interacted with are ignored


@pytest.mark.parametrize("text, where, message", [
    ("user,item\nu1,a\n", ":1:", "missing column(s) ['timestamp']"),
    ("user,item,timestamp,user_id\nu,a,1,u\n", ":1:", "names field 'user' twice"),
    ("user,item,ts,item\n", ":1:", "duplicate header column(s) ['item']"),
    (LOG + "u9,a\n", ":11:", "2 fields, the header has 4"),
    (LOG + ",a,3,click\n", ":11:", "field 'user' ('user_id') is empty"),
    (LOG + "u9,,3,click\n", ":11:", "field 'item' ('item_id') is empty"),
    (LOG + "u9,a,yesterday,click\n", ":11:", "field 'timestamp' ('timestamp'): 'yesterday' is neither"),
    (LOG + "u9,a,3,\n", ":11:", "field 'action' ('action') is empty"),
    ("", ":1:", "empty file"),
    ("user,item,timestamp\nu1,a,1\nu1,b,2\n", "log.csv:", "no user has 3 or more interactions"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, text, where, message):
  with pytest.raises(readers.DataError) as e:
    readers.read_interactions(_write(tmp_path, text), name="t")
  assert where in str(e.value) and message in str(e.value), str(e.value)
  assert str(tmp_path / "log.csv") in str(e.value)


def test_item_file_errors_and_missing_files(tmp_path):
  log = _write(tmp_path, LOG)
  bad = _write(tmp_path, "item,title\n,No id\n", "items.csv")
  with pytest.raises(readers.DataError, match=r"items.csv:2: field 'item' is empty"):
    readers.read_interactions(log, bad)
  with pytest.raises(readers.DataError, match=r"nope.csv: file not found"):
    readers.read_interactions(tmp_path / "nope.csv")
  with pytest.raises(readers.DataError, match="interactions file not found"):
    user_data.user_dataset(name="t_missing", interactions=str(tmp_path / "nope.csv"))


def test_registration_fingerprint_and_loading(tmp_path):
  log = _write(tmp_path, LOG)
  items = _write(tmp_path, "item,title\na,Apple\n", "items.csv")
  name = user_data.user_dataset(name="t_reg", interactions=str(log), items=str(items))
  assert name == "t_reg" and readers.load_dataset("t_reg").num_items == 7
  assert user_data.user_dataset(name="t_reg", interactions=str(log), items=str(items)) == "t_reg"  # same: no-op
  with pytest.raises(ValueError, match="already registered"):
    user_data.user_dataset(name="t_reg", interactions=str(log))
  with pytest.raises(ValueError, match="built-in dataset"):
    user_data.user_dataset(name="beauty", interactions=str(log))
  with pytest.raises(ValueError, match="lower-case letters"):
    user_data.user_dataset(name="My Data", interactions=str(log))
  fp = readers.dataset_fingerprint("t_reg")
  items.write_text("item,title\na,Apricot\n")  # either file's bytes key every cache built from the data
  os.utime(items, ns=(1, 1))
  fp2 = readers.dataset_fingerprint("t_reg")
  log.write_text(LOG + "u1,e,40,click\n")
  assert len({fp, fp2, readers.dataset_fingerprint("t_reg")}) == 3


def test_gin_binding_and_seqio_path_match_the_readers(tmp_path):
  import gin

  gin.clear_config()
  try:
    gin.parse_config(f"""
      from oxyjax.data import user_data
      user_data.user_dataset.name = 'toy_shop'
      user_data.user_dataset.interactions = 'data/examples/toy_shop/interactions.csv'
      user_data.user_dataset.items = 'data/examples/toy_shop/items.csv'
    """)
    name = user_data.user_dataset()
  finally:
    gin.clear_config()
  ds = readers.load_dataset(name)
  assert ds.num_users == 300 and ds.num_items == 120 and ds.item_meta[1].title
  for split in ("train", "test"):
    a = pipeline.load_split(name, split, 8, source="readers")
    b = pipeline.load_split(name, split, 8, source="seqio", tfds_dir=tmp_path / "tfds")
    assert a.equals(b), split


def test_tiny_model_trains_and_evaluates_on_the_shipped_example(tmp_path):
  from oxyjax import train as train_lib
  from oxyjax.models.encoder_decoder import ModelConfig

  name = user_data.user_dataset(name="toy_shop", interactions=os.path.join(REPO, "data/examples/toy_shop/interactions.csv"),
                                items=os.path.join(REPO, "data/examples/toy_shop/items.csv"))
  tiny = ModelConfig(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                     max_history=10)
  res = train_lib.train(dataset=name, model_config=tiny, model_dir=str(tmp_path / "run"), batch_size=32,
                        num_train_steps=6, num_epochs=None, data_source="readers", eval_every_steps=3,
                        eval_max_examples=64, eval_batch_size=64, eval_beam_size=10, log_every_steps=100,
                        mesh_shape={"data": 2, "fsdp": 2, "tensor": 2}, length_bucketing=False, verbose=False,
                        sid=train_lib.SIDConfig(codebook_size=8, embedding="collaborative",
                                                cache_dir=str(tmp_path / "sid")))
  assert res.validation["num_examples"] == 300 and res.test["num_examples"] == 300
  assert 0.0 <= res.test["recall@10"] <= 1.0

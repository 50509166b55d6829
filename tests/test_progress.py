import io

from tqdm import tqdm

from common.progress import bar_off


def test_bars_stay_out_of_redirected_logs_and_can_be_switched_off():
    log = io.StringIO()  # not a terminal, like `python train.py > run.log 2>&1`
    for _ in tqdm(range(3), file=log, disable=bar_off(True)):
        pass
    assert log.getvalue() == ""  # no escape codes in the log
    assert bar_off(True) is None and bar_off(False) is True
    tqdm.write("epoch 1/2 loss 0.5", file=log)  # the one line per epoch still reaches it
    assert log.getvalue() == "epoch 1/2 loss 0.5\n"

from models import Classifier, DataModule

import raylight as pl


def test_fit_returns_weights_to_the_driver(ray_session):
    model = Classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(max_epochs=2, num_workers=2, enable_progress_bar=False)
    trainer.fit(model, datamodule=DataModule())
    assert any(not (before[k] == v).all() for k, v in model.state_dict().items())
    assert trainer.global_step == 2 * 4  # 128 samples / 2 ranks / batch 16
    assert set(trainer.callback_metrics) == {"train_loss", "val_loss"}
    trainer.shutdown()

"""The scikit-learn estimator protocol, for the detector: parameters, fitted attributes, repr and outlier scores.

scikit-learn's outlier detectors score "the lower, the more abnormal"; DinoPatch's
own score is the other way round (a distance), and :meth:`score_samples` flips it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import params as param_table
from .calibration import Threshold
from .fitted import NotFittedError
from .goodset import FitReport

if TYPE_CHECKING:
    from .fitted import Fitted


class EstimatorMixin:
    """``get_params`` / ``set_params`` from the parameter table (:mod:`.params`), the fitted attributes
    (scikit-learn's trailing underscore) and the outlier-score API.

    The class keeps the :class:`~.fitted.Fitted` in force in ``_model`` (``model_``) and needs
    ``predict(images)`` returning results with a ``score``.
    """

    def get_params(self, deep: bool = True) -> dict:
        """Constructor parameters, as scikit-learn estimators expose them, in the table's order."""
        return {name: getattr(self, name) for name in param_table.table()}

    def set_params(self, **params):
        """Set constructor parameters; they take effect at the next :meth:`fit` (run-time ones at once)."""
        unknown = set(params) - set(param_table.table())
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)}; valid: {sorted(param_table.table())}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    @property
    def model_(self) -> Fitted:
        """The fitted model in force (:class:`~.fitted.Fitted`); NotFittedError before fit or load."""
        if (model := getattr(self, "_model", None)) is None:
            raise NotFittedError("this DinoPatch is not fitted yet: call fit(images) or DinoPatch.load(path)")
        return model

    @model_.setter
    def model_(self, model: Fitted) -> None:
        # Another detector's model, or this one's with a new engine choice: swapped in whole, as fit does.
        self._model = model

    @property
    def model_id(self) -> str:
        """Short content id of the model file this detector was saved to or loaded from."""
        return self.model_.model_id

    @property
    def threshold_(self) -> Threshold:
        """The decision threshold in force, with its source (see :class:`~.calibration.Threshold`)."""
        return self.model_.threshold

    @property
    def auto_(self) -> dict | None:
        """What fit chose for each ``"auto"`` (get_params keeps saying "auto"), and why; None when none was."""
        return self.model_.auto

    @property
    def fit_report_(self) -> FitReport | None:
        """What fit made of its good set (:class:`~.goodset.FitReport`); None for a model from before the check."""
        return self.model_.report

    def score_images(self, images) -> np.ndarray:
        """Image scores as one float array (higher = more anomalous)."""
        return np.array([r.score for r in self.predict(images)], dtype=np.float64)

    def score_samples(self, images) -> np.ndarray:
        """scikit-learn's sign: the lower, the more abnormal (``-score``)."""
        return -self.score_images(images)

    def decision_function(self, images) -> np.ndarray:
        """Negative where the score is above the threshold (scores only: ``Result.is_anomaly``
        also flags frames whose alignment could not be trusted)."""
        return self.score_samples(images) - self.offset_

    @property
    def offset_(self) -> float:
        return -self.threshold_.image

    def __repr__(self) -> str:
        defaults = param_table.defaults()
        changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

"""Few-shot learning on top of l2l_zoo: episodic datasets (``fewshot.data``), Meta-LSTM (Ravi &
Larochelle 2017), SIB (Hu et al. 2020), their smoothed variants (the smoothness paper, §5.2 and
Algorithm 2) and the baselines they are compared with. ``fewshot`` imports ``l2l_zoo``; ``l2l_zoo``
never imports ``fewshot``."""

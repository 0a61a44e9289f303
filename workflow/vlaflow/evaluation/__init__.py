"""Evaluation of trained models: open-loop on held-out episodes, closed-loop in the simulator."""

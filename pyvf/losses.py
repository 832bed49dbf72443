"""`verifree_loss` for use inside another trainer; it lives with the rest of VeriFree in
pyvf/objectives/verifree.py."""

from pyvf.objectives.verifree import VerifreeOutput, verifree_loss

__all__ = ["VerifreeOutput", "verifree_loss"]

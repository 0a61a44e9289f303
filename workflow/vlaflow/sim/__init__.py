"""The ALOHA transfer-cube simulator (gym-aloha's MuJoCo scene) and its scripted demonstrations."""

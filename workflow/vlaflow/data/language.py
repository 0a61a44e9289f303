"""The fixed text of the embedded recipe: the robot task's instruction and reasoning phrases,
the marker that ends a robot answer, and VLMEvalKit's multiple-choice prompt.

The tiny backbone's tokenizer is trained on these phrases (and on easy-vqa's questions), so
everything the embedded default feeds the model tokenizes into whole words.
"""

TRANSFER_CUBE_INSTRUCTION = "Pick up the red cube with the right arm and hand it over to the left arm."

# Scripted phases of the transfer-cube demonstration, in order, with the reasoning the
# model learns to say before acting in each.
TRANSFER_CUBE_REASONING = {
    "approach": "Move the right gripper above the red cube.",
    "descend": "Lower the right gripper around the cube.",
    "grasp": "Close the right gripper to grasp the cube.",
    "lift": "Lift the cube and move it to the middle.",
    "meet": "Bring the left gripper to the cube.",
    "handover": "Close the left gripper and open the right gripper to hand over the cube.",
    "retreat": "Move the right gripper away; the left arm holds the cube.",
}

INSERTION_INSTRUCTION = "Pick up the peg with the right arm and the socket with the left arm, and insert the peg."

# Scripted phases of the insertion demonstration (vlaflow.sim.scripted.INSERTION_PHASES).
INSERTION_REASONING = {
    "approach": "Move the grippers above the peg and the socket.",
    "descend": "Lower the grippers around the peg and the socket.",
    "grasp": "Close both grippers on the peg and the socket.",
    "lift": "Lift the peg and the socket and bring them together.",
    "align": "Line the peg up with the socket.",
    "insert": "Push the peg into the socket.",
}

NEXT_ACTION_MARKER = "Next action:"

MULTIPLE_CHOICE_INSTRUCTION = "Please select the correct answer from the options above."


def multiple_choice_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's multiple-choice prompt (ImageMCQDataset.build_prompt), character for character;
    the embedded training data asks some questions this way too."""
    prompt = f"Hint: {hint}\n" if hint is not None else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
        prompt += f"{MULTIPLE_CHOICE_INSTRUCTION} \n"  # VLMEvalKit's instruction ends with a space
    return prompt


SYSTEM_PROMPT = "You are a helpful assistant."

"""The selection document layer_select writes (selection.json, the Axolotl YAML) and the trainers read; how its lines match names."""

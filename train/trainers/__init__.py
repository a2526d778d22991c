"""The trainers a loss yaml can name (`trainer:`): BasicTrainer owns the loop, each subclass a loss."""
from train.trainers.ppo import PPOTrainer
from train.trainers.preference import BradleyTerryTrainer, KTOTrainer, PairedPreferenceTrainer
from train.trainers.sft import SFTTrainer

TRAINERS = {cls.__name__: cls for cls in (SFTTrainer, PairedPreferenceTrainer, KTOTrainer, BradleyTerryTrainer,
                                          PPOTrainer)}

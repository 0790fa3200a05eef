"""Networks the stages share: the TAEF2 autoencoder, student networks and frozen teachers.

Every classifier here takes images in [0, 1] and normalises them itself.
"""

from promptset.models.cifar_resnet import cifar_resnet
from promptset.models.students import STUDENTS, create_student
from promptset.models.taef2 import TAEF2
from promptset.models.teachers import Teacher, label_pixels, load_teacher, penultimate_features, teacher_features

__all__ = ["STUDENTS", "TAEF2", "Teacher", "cifar_resnet", "create_student", "label_pixels", "load_teacher",
           "penultimate_features", "teacher_features"]

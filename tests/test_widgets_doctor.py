"""The scene browser redraws when driven like a user would; the doctor reports every dependency."""

from course_lib import doctor
from course_lib.data import ShapeWorld, WorldConfig
from course_lib.widgets import describe_scene, scene_browser


def test_scene_browser_follows_the_slider():
    world = ShapeWorld(WorldConfig(held_out=(("red", "circle"),)))
    browser = scene_browser(world, max_index=10)
    index, split, size = browser.children[0].children
    info = browser.children[2]
    index.value = 4
    split.value = "compositional"
    text = info.value
    assert "compositional scene 4" in text
    assert "red circle" in text  # every compositional scene holds the held-out pair
    assert size.options == (32, 64, 128, 224)


def test_describe_scene_lists_every_annotation():
    scene = ShapeWorld().scene(3)
    text = describe_scene(scene)
    for obj in scene.objects:
        assert obj.name in text
    for question, answer, _ in scene.questions:
        assert f"{question} -> {answer}" in text


def test_doctor_reports_ok(capsys):
    assert doctor.main() == 0
    out = capsys.readouterr().out
    assert "OK   torch" in out and "doctor: all dependencies import" in out
    assert doctor.pinned_versions()["torch"] == "2.13.0"

"""Grading a student's file against its part's contract, for make_submission.py,
grade_submissions.py and make_autograder.py (the commands staff type). One module per layer,
each importing only those listed before it:

- ``sandbox``: the box (isolation, users, limits); nothing about contracts.
- ``exchange``: the files the grader's phases and the box hand each other.
- ``protocol``: one file checked phase by phase (inputs drawn, the box's answers, the
  judgement); nothing about Linux. Its phases run ``phase.py`` beside the contract, and the box
  runs ``answer.py`` beside the probes.
- ``verdicts``: one file's verdict (``check_file``).
- ``points``: a part's points shared by its checks.
- ``submissions``: a submission from a stranger, unpacked with care, each part's file checked.
- ``gradescope``: results.json, the autograder's zip and its run per upload.
- ``batch``: a folder of submissions graded, and the staff's report.

A submission's path: ``make_autograder.py --local`` -> gradescope.graded ->
submissions.grade_part -> verdicts.check_file -> protocol.run_checks -> sandbox.run_in_box.
"""

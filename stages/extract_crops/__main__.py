from stages.extract_crops.stage import main

main(program=True)  # the stage is the program: its workers may fork (see stage.start_method)

@echo off
rem Video Trainer installer for Windows.
rem
rem   installers\install.bat            install (or repair) into .venv and add a desktop shortcut
rem   installers\install.bat --detect   print the PyTorch build this machine would get, then exit
rem
rem Settings (environment variables):
rem   VIDEO_TRAINER_PYTHON         Python to create .venv with (default: py -3, then python)
rem   VIDEO_TRAINER_TORCH          auto, cuda or cpu   (default auto: NVIDIA if present, else CPU)
rem   VIDEO_TRAINER_TORCH_INDEX    a pip index URL for torch, used as-is
rem   VIDEO_TRAINER_TORCH_VERSION  torch version to install (default below), or "latest"
rem   VIDEO_TRAINER_NO_DESKTOP     1 = do not create the desktop shortcut

setlocal EnableExtensions DisableDelayedExpansion
rem Written with goto and call instead of ( ) blocks where paths are expanded: a project
rem folder such as "C:\Program Files (x86)\..." would otherwise end a block early.
rem Delayed expansion stays off so that a "!" in a path survives. Exit codes are checked
rem with "if errorlevel", which every cmd (and Wine's, used by the tests) handles alike.

rem Keep these in step with installers/install.sh; tests/test_install_windows.py compares them.
rem Driver CUDA version (the "CUDA Version" nvidia-smi prints) -> PyTorch wheel index, newest first.
set "CUDA_TABLE=13.0:cu130 12.8:cu128 12.6:cu126 12.4:cu124"
rem The torch release the app is tested with (same as constraints/test-cpu.txt).
set "TORCH_VERSION_DEFAULT=2.13.0"
set "TORCH_INDEX_BASE=https://download.pytorch.org/whl"

set "SELF=%~nx0"
rem The project root is the parent of this script's folder.
for %%I in ("%~dp0..") do set "ROOT=%%~fI"
set "VENV=%ROOT%\.venv"
set "VPY=%VENV%\Scripts\python.exe"
set "STAMP=%VENV%\.video-trainer-installed"
set "TMPF=%TEMP%\video-trainer-install-%RANDOM%.txt"

set "MODE=install"
if "%~1"=="" goto :args_done
if /i "%~1"=="--detect" set "MODE=detect"& goto :args_done
if /i "%~1"=="--help" goto :usage
if /i "%~1"=="/?" goto :usage
echo Unknown option: %1 (try --help) 1>&2
exit /b 2
:args_done

call :detect_torch
if errorlevel 1 goto :fail_quiet
if "%MODE%"=="detect" goto :print_detect

cd /d "%ROOT%"
if errorlevel 1 goto :fail
echo ==^> Installing Video Trainer in "%ROOT%"
echo     PyTorch build: %VARIANT% (%TAG%) from %INDEX%
rem Deleted first and written last, so an interrupted install is redone by start.bat.
if exist "%STAMP%" del /f /q "%STAMP%"

echo ==^> [1/5] Python virtual environment
call :make_venv
if errorlevel 1 goto :fail

echo ==^> [2/5] Updating pip
"%VPY%" -m pip install --upgrade pip >nul 2>&1
if errorlevel 1 echo     Could not update pip; continuing with the one in .venv.

echo ==^> [3/5] PyTorch (%VARIANT%)
call :install_torch
if errorlevel 1 goto :fail
call :installed_torch
if not defined HAVE_TORCH (
    echo ERROR: torch is not importable after installing it; see the messages above. 1>&2
    goto :fail
)
call :check_torch_build

echo ==^> [4/5] Video Trainer and its other dependencies
rem Pin the torch just installed so no dependency can swap it for another build from PyPI.
> "%VENV%\torch-constraint.txt" echo torch==%HAVE_TORCH%
"%VPY%" -m pip install --constraint "%VENV%\torch-constraint.txt" -e .
if errorlevel 1 goto :deps_failed

echo ==^> [5/5] Desktop shortcut
call :make_shortcut

> "%STAMP%" echo torch=%HAVE_TORCH% variant=%VARIANT% from=%TORCH_SOURCE%
if "%VIDEO_TRAINER_NO_DESKTOP%"=="1" goto :done_no_shortcut
echo ==^> Done. Start Video Trainer from the "Video Trainer" shortcut on your desktop,
echo     or run: "%ROOT%\installers\start.bat"
goto :done
:done_no_shortcut
echo ==^> Done. Start Video Trainer with: "%ROOT%\installers\start.bat"
:done
call :maybe_pause
exit /b 0

:print_detect
echo %VARIANT% %TAG% %INDEX%
exit /b 0

:usage
echo Video Trainer installer for Windows.
echo.
echo   installers\install.bat            install (or repair) into .venv and add a desktop shortcut
echo   installers\install.bat --detect   print the PyTorch build this machine would get, then exit
echo.
echo Settings (environment variables):
echo   VIDEO_TRAINER_PYTHON         Python to create .venv with (default: py -3, then python)
echo   VIDEO_TRAINER_TORCH          auto, cuda or cpu   (default auto: NVIDIA if present, else CPU)
echo   VIDEO_TRAINER_TORCH_INDEX    a pip index URL for torch, used as-is
echo   VIDEO_TRAINER_TORCH_VERSION  torch version to install (default %TORCH_VERSION_DEFAULT%), or "latest"
echo   VIDEO_TRAINER_NO_DESKTOP     1 = do not create the desktop shortcut
exit /b 0

:deps_failed
echo. 1>&2
echo ERROR: Installing Video Trainer's dependencies failed; see pip's message above. 1>&2
echo        Check the internet connection and free disk space, then run installers\install.bat again. 1>&2
goto :fail

:fail
echo. 1>&2
echo The installation did not finish. Video Trainer is not marked as installed, so running 1>&2
echo installers\install.bat or installers\start.bat again retries it. 1>&2
:fail_quiet
if exist "%TMPF%" del /f /q "%TMPF%" >nul 2>&1
call :maybe_pause
exit /b 1

rem ------------------------------------------------------------------------ subroutines

:maybe_pause
rem Double-clicked in Explorer, the window closes when we exit: let the user read it first.
echo %CMDCMDLINE% | find /i "%SELF%" >nul 2>&1
if not errorlevel 1 pause
exit /b 0

:detect_torch
rem Sets VARIANT (cuda, cpu, custom), TAG (cu128, cpu, custom) and INDEX (a URL).
set "VARIANT="
set "TAG="
set "INDEX="
set "CHOICE=%VIDEO_TRAINER_TORCH%"
if not defined CHOICE set "CHOICE=auto"
if /i "%CHOICE%"=="auto" set "CHOICE=auto"& goto :choice_ok
if /i "%CHOICE%"=="cuda" set "CHOICE=cuda"& goto :choice_ok
if /i "%CHOICE%"=="cpu" set "CHOICE=cpu"& goto :choice_ok
if /i "%CHOICE%"=="rocm" (
    echo ERROR: PyTorch has no ROCm build for Windows. Use VIDEO_TRAINER_TORCH=cpu, 1>&2
    echo        or install on Linux to train on an AMD GPU. 1>&2
    exit /b 1
)
echo ERROR: VIDEO_TRAINER_TORCH=%CHOICE% is not one of: auto, cuda, cpu. 1>&2
exit /b 1
:choice_ok
if defined VIDEO_TRAINER_TORCH_INDEX goto :detect_custom

set "VARIANT=cpu"
set "TAG=cpu"
if "%CHOICE%"=="cpu" goto :detect_done
call :find_nvidia_smi
if not defined SMI goto :detect_no_cuda
call "%SMI%" > "%TMPF%" 2>nul
if errorlevel 1 goto :detect_smi_failed
set "SMI_LINE="
for /f "usebackq delims=" %%L in ("%TMPF%") do (set "SMI_SCAN=%%L" & call :smi_scan)
del /f /q "%TMPF%" >nul 2>&1
if not defined SMI_LINE goto :detect_no_cuda_version
rem "| NVIDIA-SMI 572.16   Driver Version: 572.16   CUDA Version: 12.8   |" -> "12.8"
set "SMI_REST=%SMI_LINE:*CUDA Version:=%"
set "CUDA_VER="
for /f "tokens=1 delims=| " %%V in ("%SMI_REST%") do set "CUDA_VER=%%V"
set "CUDA_MAJOR=0"
set "CUDA_MINOR=0"
for /f "tokens=1,2 delims=." %%a in ("%CUDA_VER%") do (set "CUDA_MAJOR=%%a" & set "CUDA_MINOR=%%b")
set /a "CUDA_NUM=CUDA_MAJOR*100+CUDA_MINOR" 2>nul
if errorlevel 1 goto :detect_no_cuda_version
set "TAG="
for %%E in (%CUDA_TABLE%) do call :cuda_try %%E
if not defined TAG goto :detect_driver_too_old
set "VARIANT=cuda"
goto :detect_done

:detect_smi_failed
del /f /q "%TMPF%" >nul 2>&1
if "%CHOICE%"=="auto" (
    echo WARNING: nvidia-smi is installed but failed ^(driver not loaded? restart after a driver update?^). 1>&2
    echo          Not using the NVIDIA GPU. Set VIDEO_TRAINER_TORCH=cuda to install the CUDA build anyway. 1>&2
)
goto :detect_no_cuda

:detect_no_cuda
if not "%CHOICE%"=="cuda" goto :detect_done
rem Asked for CUDA without a readable driver (e.g. preparing a machine): newest build.
for /f "tokens=2 delims=: " %%T in ("%CUDA_TABLE%") do set "TAG=%%T"
set "VARIANT=cuda"
echo WARNING: VIDEO_TRAINER_TORCH=cuda but the CUDA version could not be read from nvidia-smi; 1>&2
echo          using the newest build (%TAG%). Set VIDEO_TRAINER_TORCH_INDEX to choose another. 1>&2
goto :detect_done

:detect_no_cuda_version
echo ERROR: nvidia-smi runs but does not report a CUDA version; the NVIDIA driver is probably too old. 1>&2
echo        Update the driver, or set VIDEO_TRAINER_TORCH=cpu (no GPU) or VIDEO_TRAINER_TORCH_INDEX. 1>&2
exit /b 1

:detect_driver_too_old
set "OLDEST="
for %%E in (%CUDA_TABLE%) do call :set_oldest %%E
echo ERROR: Your NVIDIA driver supports CUDA %CUDA_VER%, but PyTorch needs CUDA %OLDEST% or newer. 1>&2
echo        Update the NVIDIA driver (https://www.nvidia.com/drivers) and run this again, 1>&2
echo        or install without GPU support: set VIDEO_TRAINER_TORCH=cpu, then run install.bat. 1>&2
exit /b 1

:detect_custom
set "INDEX=%VIDEO_TRAINER_TORCH_INDEX%"
rem The tag is the last part of the URL when it names a known build (cu128, rocm6.4, cpu).
set "TAG=custom"
set "URL_LAST="
set "URL_TRIM=%INDEX%"
if "%URL_TRIM:~-1%"=="/" set "URL_TRIM=%URL_TRIM:~0,-1%"
for %%P in ("%URL_TRIM:/=" "%") do set "URL_LAST=%%~P"
if not defined URL_LAST goto :custom_variant
if /i "%URL_LAST%"=="cpu" set "TAG=cpu"
rem cu + digits, or rocm + digits and dots (for /f finds no token when only delimiters remain).
set "URL_KIND="
set "URL_REST="
if /i "%URL_LAST:~0,2%"=="cu" (set "URL_KIND=cu" & set "URL_REST=%URL_LAST:~2%")
if /i "%URL_LAST:~0,4%"=="rocm" (set "URL_KIND=rocm" & set "URL_REST=%URL_LAST:~4%")
if not defined URL_REST goto :custom_variant
set "URL_BAD="
if "%URL_KIND%"=="cu" for /f "delims=0123456789" %%R in ("%URL_REST%") do set "URL_BAD=1"
if "%URL_KIND%"=="rocm" for /f "delims=0123456789." %%R in ("%URL_REST%") do set "URL_BAD=1"
if not defined URL_BAD set "TAG=%URL_LAST%"
:custom_variant
set "VARIANT=%CHOICE%"
if not "%CHOICE%"=="auto" exit /b 0
set "VARIANT=custom"
if /i "%TAG%"=="custom" exit /b 0
if /i "%TAG%"=="cpu" set "VARIANT=cpu"
if /i "%TAG:~0,2%"=="cu" set "VARIANT=cuda"
if /i "%TAG:~0,4%"=="rocm" set "VARIANT=rocm"
exit /b 0

:detect_done
set "INDEX=%TORCH_INDEX_BASE%/%TAG%"
exit /b 0

:set_oldest
rem %1 is a table entry such as 12.4:cu124; the last one read is the oldest.
for /f "tokens=1 delims=:" %%O in ("%~1") do set "OLDEST=%%O"
exit /b 0

:smi_scan
rem Keeps the first line of nvidia-smi output that contains "CUDA Version:".
if defined SMI_LINE exit /b 0
if not "%SMI_SCAN:CUDA Version:=%"=="%SMI_SCAN%" set "SMI_LINE=%SMI_SCAN%"
exit /b 0

:cuda_try
rem %1 is a table entry such as 12.8:cu128; the first one the driver can run wins.
if defined TAG exit /b 0
set "NEED_MAJOR="
set "NEED_MINOR="
set "CAND="
for /f "tokens=1,2,3 delims=.:" %%a in ("%~1") do (set "NEED_MAJOR=%%a" & set "NEED_MINOR=%%b" & set "CAND=%%c")
set /a "NEED_NUM=NEED_MAJOR*100+NEED_MINOR"
if %CUDA_NUM% GEQ %NEED_NUM% set "TAG=%CAND%"
exit /b 0

:find_nvidia_smi
rem Drivers put nvidia-smi.exe in System32 (on PATH); older ones in Program Files\NVIDIA Corporation\NVSMI.
rem .bat and .cmd are looked for too so that tests can put a fake nvidia-smi on PATH.
set "SMI="
for %%X in (nvidia-smi.exe nvidia-smi.bat nvidia-smi.cmd) do if not defined SMI if not "%%~$PATH:X"=="" set "SMI=%%~$PATH:X"
if defined SMI exit /b 0
if exist "%ProgramFiles%\NVIDIA Corporation\NVSMI\nvidia-smi.exe" set "SMI=%ProgramFiles%\NVIDIA Corporation\NVSMI\nvidia-smi.exe"
exit /b 0

:find_python
set "PY="
if not defined VIDEO_TRAINER_PYTHON goto :find_python_auto
call :try_python "%VIDEO_TRAINER_PYTHON%"
if defined PY exit /b 0
echo ERROR: VIDEO_TRAINER_PYTHON="%VIDEO_TRAINER_PYTHON%" is not a working Python 3.10 or newer. 1>&2
exit /b 1
:find_python_auto
call :try_python py -3
if not defined PY call :try_python python
if not defined PY call :try_python python3
if defined PY exit /b 0
echo ERROR: No Python 3.10 or newer found (tried: py -3, python, python3). 1>&2
echo        Install Python 3.12 from https://www.python.org/downloads/windows/ and tick 1>&2
echo        "Add python.exe to PATH" (the Microsoft Store "python" alias is not enough), 1>&2
echo        or set VIDEO_TRAINER_PYTHON to the full path of python.exe and run this again. 1>&2
exit /b 1

:try_python
%* -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>&1
if not errorlevel 1 set PY=%*
exit /b 0

:make_venv
if not exist "%VPY%" goto :make_venv_new
"%VPY%" -c "import sys" >nul 2>&1
if errorlevel 1 goto :make_venv_broken
echo     Using the existing virtual environment in .venv
exit /b 0
:make_venv_broken
echo     .venv exists but does not work (Python moved or upgraded?); recreating it.
set "VENV_CLEAR=--clear"
:make_venv_new
call :find_python
if errorlevel 1 exit /b 1
echo     Creating .venv with %PY%
%PY% -m venv %VENV_CLEAR% "%VENV%"
if errorlevel 1 (
    echo ERROR: Could not create the virtual environment in "%VENV%". 1>&2
    echo        Check that the folder is writable and that antivirus software is not blocking it. 1>&2
    exit /b 1
)
exit /b 0

:installed_torch
set "HAVE_TORCH="
"%VPY%" -c "import importlib.metadata as m; print(m.version('torch'))" > "%TMPF%" 2>nul
if not errorlevel 1 set /p HAVE_TORCH=< "%TMPF%"
del /f /q "%TMPF%" >nul 2>&1
exit /b 0

:install_torch
set "WANT_VERSION=%VIDEO_TRAINER_TORCH_VERSION%"
if not defined WANT_VERSION set "WANT_VERSION=%TORCH_VERSION_DEFAULT%"
set "TORCH_SPEC=torch"
if /i not "%WANT_VERSION%"=="latest" set "TORCH_SPEC=torch==%WANT_VERSION%"

rem Keep a matching torch (re-runs are quick and work offline); replace one built for
rem another accelerator or version, since pip would call it "already satisfied".
set "TORCH_SOURCE=already installed"
call :installed_torch
if not defined HAVE_TORCH goto :torch_download
set "HAVE_BASE="
set "HAVE_LABEL="
for /f "tokens=1,2 delims=+" %%a in ("%HAVE_TORCH%") do (set "HAVE_BASE=%%a" & set "HAVE_LABEL=%%b")
set "TORCH_OK=1"
if /i not "%WANT_VERSION%"=="latest" if not "%HAVE_BASE%"=="%WANT_VERSION%" set "TORCH_OK=0"
if not "%TAG%"=="custom" if not "%HAVE_LABEL%"=="%TAG%" set "TORCH_OK=0"
if "%TAG%"=="cpu" if not defined HAVE_LABEL if "%HAVE_BASE%"=="%WANT_VERSION%" set "TORCH_OK=1"
if "%TAG%"=="cpu" if not defined HAVE_LABEL if /i "%WANT_VERSION%"=="latest" set "TORCH_OK=1"
if "%TORCH_OK%"=="1" (
    echo     torch %HAVE_TORCH% is already installed.
    exit /b 0
)
echo     Replacing torch %HAVE_TORCH% (wanted: %TORCH_SPEC%, build %TAG%).
"%VPY%" -m pip uninstall -y torch
if errorlevel 1 exit /b 1

:torch_download
set "TORCH_SOURCE=%INDEX%"
rem Ask the index first with a short timeout: pip would otherwise retry for minutes.
rem Only http(s) is probed; file:// and other index forms are left to pip.
if /i not "%INDEX:~0,4%"=="http" goto :torch_from_index
"%VPY%" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=10)" "%INDEX%" >nul 2>&1
if errorlevel 1 goto :torch_unreachable
:torch_from_index
echo     Downloading from %INDEX% (the CUDA build is several GB; this takes a while).
"%VPY%" -m pip install --timeout 60 --index-url "%INDEX%" "%TORCH_SPEC%"
if not errorlevel 1 exit /b 0
if not "%VARIANT%"=="cpu" goto :torch_failed
echo WARNING: Installing from %INDEX% failed; trying pip's default index instead. 1>&2
goto :torch_default_index

:torch_unreachable
if not "%VARIANT%"=="cpu" goto :torch_unreachable_gpu
echo WARNING: %INDEX% cannot be reached; installing torch from pip's default index instead. 1>&2
goto :torch_default_index

:torch_unreachable_gpu
rem pip may have a proxy configured that Python's urllib does not know about: let it try.
echo WARNING: %INDEX% could not be reached (10 s check); trying anyway with pip. 1>&2
"%VPY%" -m pip install --timeout 20 --retries 1 --index-url "%INDEX%" "%TORCH_SPEC%"
if not errorlevel 1 exit /b 0
echo ERROR: Cannot download the PyTorch %TAG% build from %INDEX%. 1>&2
echo        Check the internet connection or proxy (pip uses HTTPS_PROXY), or set 1>&2
echo        VIDEO_TRAINER_TORCH_INDEX to a mirror of that index. Without GPU support: 1>&2
echo        set VIDEO_TRAINER_TORCH=cpu, then run install.bat again. 1>&2
exit /b 1

:torch_failed
echo ERROR: Installing PyTorch (%TORCH_SPEC%, %TAG%) from %INDEX% failed; see pip's message above. 1>&2
echo        If that index has no %TORCH_SPEC% for your Python, set VIDEO_TRAINER_TORCH_VERSION=latest. 1>&2
echo        Without GPU support: set VIDEO_TRAINER_TORCH=cpu, then run install.bat again. 1>&2
exit /b 1

:torch_default_index
set "TORCH_SOURCE=pip's default index"
"%VPY%" -m pip install "%TORCH_SPEC%"
if not errorlevel 1 exit /b 0
echo ERROR: Installing PyTorch (%TORCH_SPEC%) from pip's default index failed; see pip's message above. 1>&2
echo        Check the internet connection, or set VIDEO_TRAINER_TORCH_INDEX to a reachable index. 1>&2
exit /b 1

:check_torch_build
rem pip also looks in find-links and extra-index-url from pip.ini, so a GPU install can end
rem up with another build; say so rather than leave the user wondering why the GPU is unused.
set "HAVE_LABEL="
for /f "tokens=1,2 delims=+" %%a in ("%HAVE_TORCH%") do set "HAVE_LABEL=%%b"
if "%VARIANT%"=="cpu" exit /b 0
if "%TAG%"=="custom" exit /b 0
if "%HAVE_LABEL%"=="%TAG%" exit /b 0
echo WARNING: torch %HAVE_TORCH% was installed, not the %TAG% build that was asked for 1>&2
echo          (pip may have taken it from find-links or extra-index-url in your pip configuration). 1>&2
echo          The GPU may not be used. Check "pip config list", then run installers\install.bat again. 1>&2
exit /b 0

:make_shortcut
if "%VIDEO_TRAINER_NO_DESKTOP%"=="1" (
    echo     Skipping the desktop shortcut ^(VIDEO_TRAINER_NO_DESKTOP=1^).
    exit /b 0
)
rem pythonw.exe starts the app without a console window. Paths reach PowerShell through
rem environment variables, so spaces, quotes and brackets in them need no escaping here.
set "VT_ROOT=%ROOT%"
powershell -NoProfile -ExecutionPolicy Bypass -Command "$ErrorActionPreference = 'Stop'; $root = $env:VT_ROOT; $lnk = Join-Path ([Environment]::GetFolderPath('Desktop')) 'Video Trainer.lnk'; $s = (New-Object -ComObject WScript.Shell).CreateShortcut($lnk); $s.TargetPath = Join-Path $root '.venv\Scripts\pythonw.exe'; $s.Arguments = 'main.py'; $s.WorkingDirectory = $root; $s.IconLocation = (Join-Path $root 'resources\icon.ico') + ',0'; $s.Description = 'Train video diffusion models'; $s.Save(); Write-Host ('    Shortcut: ' + $lnk)"
if errorlevel 1 (
    echo WARNING: Could not create the desktop shortcut. Start Video Trainer with installers\start.bat instead. 1>&2
)
exit /b 0
